"""MoELayer: router + backend + shared experts -> MoEOutput (the contract: docs/contract.md §2).

Shape legend: T tokens (all leading dims flattened), D model width, E routed experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compute.assignments import Routing
from ..compute.backends import get_backend
from ..compute.experts import ExpertBank
from ..compute.input_weighted import input_weighted
from .config import MoEConfig
from .router_grad import make_estimator
from .routing import Router, reset_balance_counts, set_balance_counts


@dataclass
class MoEOutput:
    y: torch.Tensor  # [..., D], FFN output only: the caller adds the residual
    aux_loss: torch.Tensor  # 0-d, the sum of `losses`
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: Routing | None = None
    # variant-specific tensors a caller may use, e.g. moe_plus_plus's "gate_logits" [T, P] for
    # the next layer's gating residual; empty for most variants
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # which expert-compute path the backend ran ("loop", "padded", "grouped_mm", "per_expert",
    # "padded_bmm", "megablocks"); None where no backend runs (dense)
    dispatch_path: str | None = None


def check_input_dtype(x: torch.Tensor, param: torch.Tensor) -> None:
    """The input's dtype must be the parameters', or autocast must be on to reconcile them."""
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"input dtype={x.dtype} must match the layer's parameters ({param.dtype}), or run "
            f"under torch.autocast; cast one of them (layer.to(dtype) or x.to({param.dtype}))"
        )


def flatten_tokens(x: torch.Tensor, d_model: int) -> tuple[torch.Tensor, int]:
    """x [..., D] -> (x_TD, number of sequences). [B, S, D] holds B sequences; [S, D] holds one."""
    if x.dim() == 0 or x.shape[-1] != d_model:
        got = tuple(x.shape)
        raise ValueError(f"input shape {got}: last dim must equal d_model={d_model}")
    if x.numel() == 0:
        raise ValueError(f"input shape {tuple(x.shape)} holds 0 tokens; need at least 1")
    if not x.is_floating_point():
        raise ValueError(f"input dtype={x.dtype} must be a floating point dtype")
    num_seqs = math.prod(x.shape[:-2]) if x.dim() >= 3 else 1
    return x.reshape(-1, d_model), num_seqs


def assemble(
    x: torch.Tensor,
    y_TD: torch.Tensor,
    losses: dict[str, torch.Tensor],
    routing: Routing,
    dispatch_path: str | None = None,
) -> MoEOutput:
    aux = sum(losses.values()) if losses else torch.zeros((), device=x.device)
    return MoEOutput(
        y=y_TD.view(x.shape),
        aux_loss=aux,
        losses=losses,
        routing=routing,
        dispatch_path=dispatch_path,
    )


class MoELayer(nn.Module):
    """`y = shared(x) + backend(x, router(x), experts)`; see `variants.build`."""

    def __init__(self, cfg: MoEConfig, router: Router) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = router
        # `expert_bias` (gpt-oss's experts) where a config has it
        bias = getattr(cfg, "expert_bias", False)
        self.experts = ExpertBank(
            cfg.num_experts, cfg.d_model, cfg.expert_hidden, cfg.activation, bias
        )
        # Qwen2-MoE options (`SharedExpertConfig`): shared width and sigmoid gate
        self.shared = (
            ExpertBank(cfg.num_shared_experts, cfg.d_model, cfg.shared_width, cfg.activation, bias)
            if cfg.num_shared_experts
            else None
        )
        gated = self.shared is not None and getattr(cfg, "shared_gate", False)
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if gated else None
        self.backend = expert_compute(cfg, cfg.backend)
        # `router_grad`: what reaches the router in the backward (variants.contract.router_grad)
        self.router_grad = make_estimator(cfg)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        """`token_ids` (x's shape without D, integer): the tokens' ids, read by routers whose
        config sets `uses_token_ids` (hash routing) and ignored by the others."""
        x_TD, num_seqs = flatten_tokens(x, self.cfg.d_model)
        check_input_dtype(x_TD, self.experts.w1)
        routing, losses = self.router(x_TD, num_seqs, token_ids)
        y_TD, path = self.backend(x_TD, routing, self.experts)
        y_TD = self.router_grad(x_TD, routing, y_TD, self.experts)
        return assemble(x, self.add_shared(x_TD, y_TD), losses, routing, path)

    def add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """y + sum_s FFN_s(x), scaled by sigmoid(x w_g) when `shared_gate` (Qwen2-MoE)."""
        if self.shared is None:
            return y_TD
        shared_TD = self.shared.sum_all(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return y_TD + shared_TD

    def update_bias(self) -> None:
        """Once per optimizer step: the router's state update (DeepSeek-V3's bias, ReMoE's L1
        coefficient) from the training forwards since the last call; global-batch balance
        counts (`balance_scope="global_batch"`) start afresh."""
        self.router.update_bias()
        reset_balance_counts(self.router)

    def set_balance_counts(self, counts: torch.Tensor | None) -> None:
        """`balance_scope="global_batch"`: use these per-expert counts of the whole step (all
        micro-batches and ranks, summed by the caller) for f_i until `update_bias()`; None goes
        back to the running count. See `variants.contract.routing.scoped_balance_inputs`."""
        set_balance_counts(self.router, counts)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"E={c.num_experts}, K={c.top_k}, D={c.d_model}, H={c.expert_hidden}, "
            f"shared={c.num_shared_experts}, backend={c.backend!r}"
        )


def expert_compute(cfg: MoEConfig, backend: str) -> Callable:
    """The backend `backend` as `cfg` applies its combine weights: on the experts' outputs,
    or on their inputs where `cfg.weight_on_input` (Llama 4)."""
    spec = get_backend(backend)
    return input_weighted(spec) if cfg.weight_on_input else spec


def routed(router_cls: type[Router]) -> Callable[[MoEConfig], nn.Module]:
    """Layer factory for a token-choice or expert-choice variant defined by its router."""
    return lambda cfg: MoELayer(cfg, router_cls(cfg))
