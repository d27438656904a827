"""Expert compute backends: `(x_TD, routing, bank) -> y_TD`, one interface for every variant.

Shape legend: T tokens, D model width, H expert hidden width, E experts, A kept assignments,
C per-expert capacity.

Each computes `y[t] = sum over kept a with token[a] = t of weight[a] * FFN_expert[a](x[t])`;
shared experts are added by the layer. `loop` is the reference the others are tested against.
A backend returns `Computed(y_TD, path)`: the output and which expert-compute path ran (the
layer reports it as `MoEOutput.dispatch_path`); the Routing record it reads stays unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from .assignments import Routing
from .dispatch import (
    FLOP_SECONDS,
    OP_SECONDS,
    PADDED_BMM,
    PATHS,
    PER_EXPERT,
    PER_EXPERT_OPS,
    ExpertFFN,
    ExpertRows,
    GatherMM,
    Group,
    WeightedMMScatter,
    expert_order,
    group_rows,
    padded_groups,
    rank_in_expert,
)
from .experts import ExpertBank, ExpertWeights
from .megablocks import megablocks_forward


class Computed(NamedTuple):
    """What a backend returns: the routed experts' output and the expert-compute path that ran
    ("loop", "padded", "grouped_mm", "per_expert", "padded_bmm", "megablocks")."""

    y_TD: torch.Tensor
    path: str


Backend = Callable[[torch.Tensor, Routing, ExpertBank], Computed]


class LayerConfig(Protocol):
    """What `BackendSpec.check` reads of a layer config: attributes of the base class
    (`variants.contract.config.MoEConfig`) only, so no backend depends on a variant; and
    `expert_bias` where a config has it (read with a default of False)."""

    backend: str
    capacity_factor: float | None
    uneven_top_k: str | None


def _combine(x_TD: torch.Tensor, token_A: torch.Tensor, out_AD: torch.Tensor) -> torch.Tensor:
    """Scatter-add weighted expert outputs back to their tokens (out of place, for autograd)."""
    return x_TD.new_zeros(x_TD.shape).index_add(0, token_A, out_AD)


def loop(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> Computed:
    """Reference: one boolean mask and one plain FFN per expert. Slow, obviously right."""
    y_TD = x_TD.new_zeros(x_TD.shape)
    weight_A = routing.weight.to(x_TD.dtype)
    for e in range(bank.num_experts):
        mask_A = routing.expert == e
        token_N = routing.token[mask_A]
        out_ND = bank.expert_ffn(e, x_TD[token_N]) * weight_A[mask_A, None]
        y_TD = y_TD.index_add(0, token_N, out_ND)
    return Computed(y_TD, "loop")


def padded_rows_cheaper(
    counts: list[int], groups: list[Group], d_model: int, hidden: int, projections: int
) -> bool:
    """The measured rule of `dispatch_layout`: pad every expert to its group's largest load
    (`groups` from `padded_groups`) when the GEMM work on the pad rows costs less than the
    per-expert dispatch it saves.

    A pad row costs a real row's forward+backward FLOPs (3 GEMMs per projection); an expert on
    the per-expert path costs `PER_EXPERT_OPS` ops of dispatch; the padded path runs one bmm
    per non-empty group (constants and their measurement: `variants.compute.dispatch`).
    """
    busy = sum(1 for n in counts if n)
    if not busy:
        return False
    pad_rows = sum((e1 - e0) * C for e0, e1, C in groups) - sum(counts)
    pad_seconds = pad_rows * 2 * d_model * hidden * projections * 3 * FLOP_SECONDS
    saved_ops = (busy - sum(1 for *_, C in groups if C)) * PER_EXPERT_OPS
    return pad_seconds < saved_ops * OP_SECONDS


def dispatch_layout(
    routing: Routing, weight_A: torch.Tensor, bank: ExpertBank, path: str | None = None
) -> tuple[ExpertRows, torch.Tensor]:
    """(rows, weight_R): the dispatch layout of `routing` and the combine weight of each row.

    `path` forces "per_expert" or "padded_bmm"; None chooses by `padded_rows_cheaper`. The
    sort, the counts (one `.tolist()`) and the gathers run once per call.
    """
    counts = routing.load.tolist()
    groups = padded_groups(counts)
    if path is None:
        projections = 2 if bank.w3 is None else 3
        cheaper = padded_rows_cheaper(counts, groups, bank.d_model, bank.hidden, projections)
        path = PADDED_BMM if cheaper else PER_EXPERT
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {PATHS}")
    order_A = expert_order(routing.expert, len(counts))
    token_A, weight_A = routing.token[order_A], weight_A[order_A]
    A = token_A.numel()
    if path == PER_EXPERT or not A:
        return ExpertRows.from_counts(token_A, counts, routing.num_tokens), weight_A
    bounds, row_E, R = group_rows(groups)
    expert_A = routing.expert[order_A]
    first_E = torch.cumsum(routing.load, 0) - routing.load  # each expert's first sorted index
    rank_A = torch.arange(A, device=token_A.device) - first_E[expert_A]
    slot_A = torch.tensor(row_E, device=token_A.device)[expert_A] + rank_A
    # pad rows: token 0, weight 0 (they add exact zeros to y and every gradient)
    token_R = token_A.new_zeros(R).index_put_((slot_A,), token_A)
    weight_R = weight_A.new_zeros(R).index_put((slot_A,), weight_A)
    return ExpertRows.from_groups(token_R, bounds, routing.num_tokens, PADDED_BMM), weight_R


def grouped(
    x_TD: torch.Tensor,
    routing: Routing,
    bank: ExpertBank,
    use_grouped_mm: bool | None = None,
    path: str | None = None,
) -> Computed:
    """Dropless: assignments grouped by expert, GEMMs per expert (or per group of experts).

    On CUDA (with 16-byte aligned rows) one `grouped_mm` kernel per projection; elsewhere
    GEMMs on row slices with no [A, D] copies (`variants.compute.dispatch` has the CPU profile
    behind it), either one `mm` per expert or, when `padded_rows_cheaper` says so, one `bmm` per
    group of experts padded to the group's largest load. `use_grouped_mm` and `path` force
    the choice (tests check every path on CPU). The path that ran ("grouped_mm", "per_expert"
    or "padded_bmm") is returned with the output.

    Every GEMM runs in one dtype: autocast's where it is on (it does not reach into the
    custom autograd Functions), else the input's.

    A bank with biases or the clamped activation (not `bank.plain`) takes the per-expert path
    (or grouped_mm), its biases added per row: the fused padded_bmm kernel has neither.
    """
    device, out_dtype = x_TD.device.type, x_TD.dtype
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else out_dtype
    if use_grouped_mm is None:
        use_grouped_mm = path is None and x_TD.is_cuda and _aligned(dtype, bank)
    if not bank.plain:
        if path == PADDED_BMM:
            raise ValueError(
                f"path={path!r} computes gelu or swiglu experts without biases; this bank has "
                f"activation={bank.activation!r}, bias={bank.bias}: use path='per_expert'"
            )
        path = PER_EXPERT
    with torch.autocast(device, enabled=False):
        x_TD, weights = x_TD.to(dtype), bank.weights(dtype)
        weight_A = routing.weight.to(dtype)
        if use_grouped_mm:
            y_TD = _grouped_mm(x_TD, routing, weight_A, weights, bank)
            return Computed(y_TD.to(out_dtype), "grouped_mm")
        rows, weight_R = dispatch_layout(routing, weight_A, bank, path)
        if rows.path == PADDED_BMM:
            y_TD = ExpertFFN.apply(
                x_TD, weight_R, rows, bank.activation, weights.w1, weights.w2, weights.w3
            )
        else:
            expert_R = _sorted_experts(routing) if bank.bias else None
            w_in = (weights.w1,) if weights.w3 is None else (weights.w1, weights.w3)
            h_RH = GatherMM.apply(x_TD, rows, *w_in)
            h1_RH, h3_RH = _add_bias(bank, h_RH, expert_R, dtype)
            act_RH = bank.act(h1_RH, h3_RH)
            y_TD = WeightedMMScatter.apply(act_RH, weight_R, weights.w2, rows)
            if bank.bias:
                b2_RD = bank.b2.to(dtype)[expert_R] * weight_R[:, None]
                y_TD = y_TD.index_add(0, rows.token_R, b2_RD)
    return Computed(y_TD.to(out_dtype), rows.path)  # like loop and padded: the input's dtype


def _sorted_experts(routing: Routing) -> torch.Tensor:
    """[A] the expert of each assignment in expert order (the rows of the per-expert path)."""
    experts_E = torch.arange(routing.load.numel(), device=routing.load.device)
    return experts_E.repeat_interleave(routing.load)


def _add_bias(
    bank: ExpertBank,
    h_RH: tuple[torch.Tensor, ...],
    expert_R: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h1, h3) of rows sorted by expert, each plus its expert's b1 (b3) where the bank has
    biases; h3 is None for gelu."""
    h1_RH, h3_RH = h_RH[0], (h_RH[1] if len(h_RH) > 1 else None)
    if expert_R is None:
        return h1_RH, h3_RH
    h1_RH = h1_RH + bank.b1.to(dtype)[expert_R]
    h3_RH = h3_RH + bank.b3.to(dtype)[expert_R] if h3_RH is not None else None
    return h1_RH, h3_RH


def _aligned(dtype: torch.dtype, bank: ExpertBank) -> bool:
    """grouped_mm takes bfloat16 (its documented input dtype on CUDA, SM >= 80) with 16-byte
    aligned rows of x, h and the weights; other dtypes take the per-expert path."""
    if dtype != torch.bfloat16:
        return False
    per_16_bytes = 16 // dtype.itemsize
    return bank.d_model % per_16_bytes == 0 and bank.hidden % per_16_bytes == 0


def _grouped_mm(
    x_TD: torch.Tensor,
    routing: Routing,
    weight_A: torch.Tensor,
    weights: ExpertWeights,
    bank: ExpertBank,
) -> torch.Tensor:
    """One `torch.nn.functional.grouped_mm` per projection over the [A, D] rows sorted by
    expert (jagged groups given by cumulative offsets), weighed and scattered back."""
    order_A = expert_order(routing.expert, weights.w1.shape[0])
    token_A = routing.token[order_A]
    offs_E = torch.cumsum(routing.load, 0).to(torch.int32)
    x_AD = x_TD[token_A]
    h1_AH = F.grouped_mm(x_AD, weights.w1, offs=offs_E)
    h3_AH = F.grouped_mm(x_AD, weights.w3, offs=offs_E) if weights.w3 is not None else None
    expert_A = _sorted_experts(routing) if bank.bias else None
    h_AH = (h1_AH,) if h3_AH is None else (h1_AH, h3_AH)
    out_AD = F.grouped_mm(
        bank.act(*_add_bias(bank, h_AH, expert_A, x_AD.dtype)), weights.w2, offs=offs_E
    )
    if expert_A is not None:
        out_AD = out_AD + bank.b2.to(x_AD.dtype)[expert_A]
    return _combine(x_TD, token_A, out_AD * weight_A[order_A, None])


def padded(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> Computed:
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
    h1 = torch.bmm(buf_ECD, bank.w1)
    h3 = torch.bmm(buf_ECD, bank.w3) if bank.w3 is not None else None
    if bank.bias:  # pad slots get bias-only rows; they are never read back (slot_A only)
        h1 = h1 + bank.b1[:, None].to(h1.dtype)
        h3 = h3 + bank.b3[:, None].to(h3.dtype) if h3 is not None else None
    out_ECD = torch.bmm(bank.act(h1, h3), bank.w2)
    if bank.bias:
        out_ECD = out_ECD + bank.b2[:, None].to(out_ECD.dtype)
    out_AD = out_ECD.view(E * C, D)[slot_A] * routing.weight[:, None].to(x_TD.dtype)
    return Computed(_combine(x_TD, routing.token, out_AD), "padded")


def megablocks(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> Computed:
    """megablocks' dropless grouped kernels (GPU only; the optional megablocks package is
    imported by `variants.compute.megablocks` on first use)."""
    return Computed(megablocks_forward(x_TD, routing, bank), "megablocks")


@dataclass(frozen=True)
class BackendSpec:
    """A backend and what it can compute, declared beside its code: the one list of backends.

    `MoEConfig.validate` asks `check(cfg)`, so a layer config a backend cannot compute fails
    at build time with one line; adding a backend means adding its function and one spec here.
    Devices and dtypes are checked where the tensors are known, at the forward: only
    `megablocks` is limited (CUDA, bfloat16), and `variants.compute.megablocks` refuses other
    tensors with one line naming the tensor, its device or dtype and what it needs.
    """

    name: str
    compute: Backend
    capacity: str = "optional"  # "required" (capacity buffers), "optional", "refused"
    uneven_top_k: bool = True  # routings where tokens keep different numbers of experts
    # computes a rank's local experts under expert parallelism (`variants.parallel`): the
    # received rows form a dropless routing with 0..L experts per row, no capacity
    expert_parallel: bool = False
    # computes experts with biases (a config's `expert_bias`, gpt-oss)
    expert_bias: bool = True

    def __call__(self, x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> Computed:
        return self.compute(x_TD, routing, bank)

    def check(self, cfg: LayerConfig) -> None:
        """ValueError naming the field when `cfg` asks for what this backend cannot compute;
        the backends that can are read from `BACKENDS`, never listed by hand."""
        if self.capacity == "required" and cfg.capacity_factor is None:
            raise ValueError(
                f"backend={self.name!r} needs capacity buffers, but capacity_factor=None "
                f"(dropless); set capacity_factor or use {able(lambda b: b.capacity != 'required')}"
            )
        if not self.uneven_top_k and cfg.uneven_top_k is not None:
            raise ValueError(
                f"backend={self.name!r} cannot compute this variant: {cfg.uneven_top_k}, and "
                f"{self.name} needs exactly top_k experts per token; "
                f"use {able(lambda b: b.uneven_top_k)}"
            )
        if not self.expert_bias and getattr(cfg, "expert_bias", False):
            raise ValueError(
                f"backend={self.name!r} cannot compute experts with biases (expert_bias=True); "
                f"use {able(lambda b: b.expert_bias)}"
            )
        if self.capacity == "refused" and cfg.capacity_factor is not None:
            raise ValueError(
                f"capacity_factor={cfg.capacity_factor} must be None for backend={self.name!r} "
                "(dropless kernels only); set capacity_factor=None or use "
                f"{able(lambda b: b.capacity != 'refused')}"
            )


def able(fits: Callable[[BackendSpec], bool]) -> str:
    """ "'loop' or 'grouped'": the backends for which `fits` holds, in registry order."""
    names = [repr(name) for name, spec in BACKENDS.items() if fits(spec)]
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("loop", loop, expert_parallel=True),
        BackendSpec("grouped", grouped, expert_parallel=True),
        BackendSpec("padded", padded, capacity="required"),
        BackendSpec(
            "megablocks", megablocks, capacity="refused", uneven_top_k=False, expert_bias=False
        ),
    )
}


def get_backend(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {', '.join(map(repr, BACKENDS))}")
    return BACKENDS[name]
