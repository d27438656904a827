"""Expert compute backends: `(x_TD, routing, bank) -> y_TD`, one interface for every variant.

Shape legend: T tokens, D model width, H expert hidden width, E experts, A kept assignments,
C per-expert capacity.

Each computes `y[t] = sum over kept a with token[a] = t of weight[a] * FFN_expert[a](x[t])`;
shared experts are added by the layer. `loop` is the reference the others are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .experts import ExpertBank
from .routing import Routing, rank_in_expert

Backend = Callable[[torch.Tensor, Routing, ExpertBank], torch.Tensor]


def _combine(x_TD: torch.Tensor, token_A: torch.Tensor, out_AD: torch.Tensor) -> torch.Tensor:
    """Scatter-add weighted expert outputs back to their tokens (out of place, for autograd)."""
    return x_TD.new_zeros(x_TD.shape).index_add(0, token_A, out_AD)


def loop(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """Reference: one boolean mask and one plain FFN per expert. Slow, obviously right."""
    y_TD = x_TD.new_zeros(x_TD.shape)
    weight_A = routing.weight.to(x_TD.dtype)
    for e in range(bank.num_experts):
        mask_A = routing.expert == e
        token_N = routing.token[mask_A]
        out_ND = bank.expert_ffn(e, x_TD[token_N]) * weight_A[mask_A, None]
        y_TD = y_TD.index_add(0, token_N, out_ND)
    return y_TD


def grouped(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """Dropless: sort assignments by expert, one grouped GEMM per projection, scatter back."""
    order_A = torch.argsort(routing.expert, stable=True)
    token_A = routing.token[order_A]
    offs_E = torch.cumsum(routing.load, 0).to(torch.int32)
    x_AD = x_TD[token_A]
    h1_AH = F.grouped_mm(x_AD, bank.w1, offs=offs_E)
    h3_AH = F.grouped_mm(x_AD, bank.w3, offs=offs_E) if bank.w3 is not None else None
    out_AD = F.grouped_mm(bank.act(h1_AH, h3_AH), bank.w2, offs=offs_E)
    out_AD = out_AD * routing.weight[order_A, None].to(x_TD.dtype)
    return _combine(x_TD, token_A, out_AD)


def padded(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """GShard/Switch style: capacity buffers [E, C, D] and one batched matmul per projection.

    C is the routing's capacity; where a routing has none (a dropless eval forward of a variant
    that drops only in training), the largest load is used so nothing is lost.
    """
    E, D = bank.num_experts, bank.d_model
    A = routing.expert.numel()
    C = routing.capacity if routing.capacity is not None else int(routing.load.max())
    if A and int(routing.load.max()) > C:
        raise ValueError(
            f"routing keeps {int(routing.load.max())} assignments on one expert, more than its "
            f"capacity={C}: the router did not apply its capacity"
        )
    pos_A = rank_in_expert(routing.expert, torch.arange(A, device=x_TD.device), E)
    slot_A = routing.expert * C + pos_A
    buf_ECD = x_TD.new_zeros(E * C, D).index_put((slot_A,), x_TD[routing.token]).view(E, C, D)
    h3 = torch.bmm(buf_ECD, bank.w3) if bank.w3 is not None else None
    out_ECD = torch.bmm(bank.act(torch.bmm(buf_ECD, bank.w1), h3), bank.w2)
    out_AD = out_ECD.view(E * C, D)[slot_A] * routing.weight[:, None].to(x_TD.dtype)
    return _combine(x_TD, routing.token, out_AD)


def megablocks(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """megablocks' dropless grouped kernels (GPU only), imported on first use."""
    from .megablocks import megablocks_forward

    return megablocks_forward(x_TD, routing, bank)


BACKENDS: dict[str, Backend] = {
    "loop": loop,
    "grouped": grouped,
    "padded": padded,
    "megablocks": megablocks,
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {', '.join(map(repr, BACKENDS))}")
    return BACKENDS[name]
