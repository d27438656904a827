"""Peer systems: other libraries' MoE layers, unmodified, as rows beside our variants.

Shape legend: T tokens, D model width, E experts, K experts per token, A = T*K assignments.

`megablocks_dmoe` is megablocks' own `dMoE` (Gale et al. 2023, arXiv:2211.15841; megablocks
0.10.0, layers/dmoe.py): its LearnedRouter (softmax, top-k), its dropless grouped expert
computation (`mlp_impl='grouped'`) and its load-balancing loss. Only its Arguments are ours,
mapped from the same config fields every variant has (`megablocks_arguments`), and its output
is wrapped as a `variants.MoEOutput` so tasks treat it like any variant. GPU only, bfloat16
only (grouped_gemm); megablocks is imported on first use.

Where the peer departs from our layers (on purpose: it is the reference system as shipped):
- its router computes in the weights' dtype (bf16), not in `router_dtype`; `router_dtype` and
  `backend` are accepted, recorded and not applied;
- combine weights are the top-k softmax probabilities, renormalised only when
  `normalize_expert_weights` (a p-norm, megablocks' field) is set;
- its initialisation (normal, std 0.02) is megablocks' own.

Balance loss: megablocks computes `moe_loss_weight * E / (T K) * sum_i c_i P_i`
(layers/moe.py, batched_load_balancing_loss) = the contract's Mixtral form
`coef * E * sum_i f_i P_i`
with `f_i = c_i / (T K)`; `balance_coef` defaults to 0.01 like Mixtral's, so the two compare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from variants import MoEConfig, MoEOutput, Routing
from variants.compute.assignments import make_routing
from variants.compute.megablocks import check_dtype, require_megablocks
from variants.contract.config import check_number
from variants.contract.layer import assemble, flatten_tokens
from variants.contract.routing import flatten_topk

# megablocks' default activation_fn is tanh-approximate gelu; the contract's gelu is the exact
# erf form.
# GLU computes activation_fn(x @ w1) * (x @ v1), so silu there is SwiGLU.
ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": partial(F.gelu, approximate="none"),
    "swiglu": F.silu,
}
MLP_TYPES = {"gelu": "mlp", "swiglu": "glu"}


@dataclass
class MegablocksDMoEConfig(MoEConfig):
    """The common fields (sizes, activation, shared experts, uniform routing) plus megablocks'."""

    dropless: ClassVar[str | None] = "megablocks' dMoE is dropless"
    note: ClassVar[str] = (
        "megablocks' own loss 0.01 · E/(T·K) · Σ_i c_i P_i, c_i the assignments to i: the "
        "Mixtral form 0.01 · E · Σ_i f_i P_i with f_i = c_i/(T·K) (Gale et al. 2023)."
    )
    balance_coef: float = 0.01  # megablocks' moe_loss_weight (its own default is 0.1)
    normalize_expert_weights: float | None = None  # megablocks' moe_normalize_expert_weights

    def validate(self) -> None:
        super().validate()
        check_number(self, "balance_coef", minimum=0)
        if self.normalize_expert_weights is not None:
            check_number(self, "normalize_expert_weights", positive=True)


def megablocks_arguments(
    cfg: MegablocksDMoEConfig, device: torch.device | str, dtype: torch.dtype
) -> dict[str, Any]:
    """Keyword arguments of `megablocks.layers.arguments.Arguments` for one dMoE layer."""
    return dict(
        hidden_size=cfg.d_model,
        ffn_hidden_size=cfg.expert_hidden,
        moe_num_experts=cfg.num_experts,
        moe_top_k=cfg.top_k,
        mlp_type=MLP_TYPES[cfg.activation],
        mlp_impl="grouped",
        activation_fn=ACTIVATION_FNS[cfg.activation],
        moe_loss_weight=cfg.balance_coef,
        moe_lbl_in_fp32=True,  # the loss in fp32, as our routers compute theirs
        moe_normalize_expert_weights=cfg.normalize_expert_weights,
        uniform_expert_assignment=cfg.force_uniform_routing,
        # Ks shared experts of width H summed are one FFN of width Ks*H: megablocks' shared expert
        shared_expert=cfg.num_shared_experts > 0,
        shared_expert_hidden_size=cfg.num_shared_experts * cfg.expert_hidden or None,
        bias=False,  # our layers have no biases; with one, dMoE would return (y, bias)
        return_bias=False,
        num_layers=1,  # the loss is read back per layer, right after its forward
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        device=device,
    )


@contextmanager
def outputs_of(module: nn.Module) -> Iterator[list[Any]]:
    """Collect what `module` returns while the block runs (a forward hook, removed after)."""
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


class MegablocksDMoE(nn.Module):
    """megablocks' dMoE, run as is, returning a MoEOutput (y, its balance loss, its routing)."""

    def __init__(self, cfg: MegablocksDMoEConfig, moe: nn.Module, args: Any, lbl: Any) -> None:
        super().__init__()
        self.cfg, self.moe, self.args = cfg, moe, args
        self.lbl = lbl  # megablocks.layers.moe: where dMoE leaves its load-balancing inputs

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        """`token_ids` is accepted and ignored (dMoE's router does not read ids)."""
        flatten_tokens(x, self.cfg.d_model)  # the same input checks as every variant
        # dMoE appends (tokens_per_expert, scores) to a module-level list in megablocks
        # (layers/moe.py, _LOAD_BALANCING_LOSS) in training, for the trainer to reduce over
        # layers. This wrapper reads this layer's entry right after its forward, through
        # megablocks' own batched_load_balancing_loss (num_layers=1), and clears the list
        # before and after, so no state outlives the call and each layer returns its loss.
        self.lbl.clear_load_balancing_loss()
        with outputs_of(self.moe.router) as routed, outputs_of(self.moe.router.layer) as logits:
            y = self.moe(x)
        losses = {}
        if self.training and self.cfg.balance_coef > 0:
            losses["balance"] = self.lbl.batched_load_balancing_loss(self.args)
            self.lbl.clear_load_balancing_loss()
        return assemble(x, y, losses, peer_routing(*routed[0], logits[0]))

    def update_bias(self) -> None:
        """No loss-free bias in dMoE; here so training loops need no special case."""


def peer_routing(
    scores_TE: torch.Tensor,
    weight_TK: torch.Tensor,
    expert_TK: torch.Tensor,
    logits_TE: torch.Tensor,
) -> Routing:
    """A Routing from what dMoE's LearnedRouter returns: dropless, so demand equals load."""
    token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
    demand_E = torch.bincount(expert_A, minlength=scores_TE.shape[-1])
    return make_routing(token_A, expert_A, weight_A, scores_TE, logits_TE, demand_E)


def build_megablocks_dmoe(
    cfg: MegablocksDMoEConfig,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """megablocks' dMoE for `cfg` on `device` in `dtype` (bfloat16), wrapped."""
    what = "variant 'megablocks_dmoe'"
    require_megablocks(what)
    check_dtype(dtype, what)
    from megablocks.layers import moe as lbl
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(**megablocks_arguments(cfg, device, dtype))
    return MegablocksDMoE(cfg, dMoE(args), args, lbl).to(device, dtype)


def param_counts(cfg: MoEConfig) -> tuple[int, int]:
    """(total, active per token) of a dMoE built from `cfg`: router [E, D] (no bias), routed
    and shared expert matrices of D x H (two, three for glu), K of E routed experts active."""
    mats = 3 if cfg.activation == "swiglu" else 2
    expert = mats * cfg.d_model * cfg.expert_hidden
    router = cfg.num_experts * cfg.d_model
    shared = cfg.num_shared_experts * expert
    return (
        router + shared + cfg.num_experts * expert,
        router + shared + cfg.top_k * expert,
    )
