"""Router-gradient estimators: what reaches the router in the backward pass (`router_grad`).

Shape legend: T tokens, D model width, E routed experts, A kept assignments.

With top-K routing the router's gradient comes only through the K kept weights of each token:
`dL/ds_ti = <dL/dy_t, FFN_i(x_t)>` for kept i, 0 for every other expert. An estimator is a
module the layer calls after its backend, `y_TD = estimator(x_TD, routing, y_TD, bank)`; it may
add terms whose value is zero but whose gradient is not. One estimator per name of
`variants.contract.config.ROUTER_GRADS`, registered in `ESTIMATORS`. An estimator that acts on
the router's selection and weights instead (SparseMixer's, arXiv:2409.12136) does so in its
`select`, which the router calls where scores become a top-K choice (`Router.select`), and
passes the output through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..compute.assignments import Routing
from ..compute.experts import ExpertBank
from .sparsemixer import sparsemixer

# a variant's own selection: () -> (weight_TK, expert_TK)
Rule = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class TopK(nn.Module):
    """`topk`: the plain top-K gradient; the output passes through untouched."""

    # an estimator that needs every expert's outputs on one rank says so (variants.parallel)
    expert_parallel: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: Any) -> TopK:
        return cls()

    @staticmethod
    def select(
        cfg: Any, logits_TE: torch.Tensor, rule: Rule, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_TK, expert_TK): the variant's own top-K `rule`."""
        return rule()

    @staticmethod
    def counted(expert_TK: torch.Tensor, rule: Rule) -> torch.Tensor:
        """[T, K]: the choices a balance loss counts, here the selection's own."""
        return expert_TK

    def forward(
        self, x_TD: torch.Tensor, routing: Routing, y_TD: torch.Tensor, bank: ExpertBank
    ) -> torch.Tensor:
        return y_TD


def kept_mask(routing: Routing) -> torch.Tensor:
    """Bool [T, E]: the (token, expert) pairs the routing kept (after capacity drops)."""
    keep_TE = torch.zeros_like(routing.scores, dtype=torch.bool)
    keep_TE[routing.token, routing.expert] = True
    return keep_TE


class DefaultMoE(TopK):
    """`default_moe`: Default MoE (Panda et al. 2025, "Dense Backpropagation Improves Training
    for Sparse Mixture-of-Experts", arXiv:2504.12463).

    Every expert i a token did not use stands in with a default output `default_output[i]`
    (buffer [E, D]), an exponential moving average of expert i's outputs:

        default_i <- decay * default_i + (1 - decay) * mean over the tokens kept by i of FFN_i(x)

    so the router's gradient is dense: `dL/ds_ti = <dL/dy_t, default_i>` for every expert i
    that token t did not keep, where s_ti is `Routing.scores` (the affinity without balancing
    bias; the paper's softmax pi_i), as well as the usual top-K terms for kept experts.

    How it is applied, and where it departs from the paper:
    - Forward output unchanged: the stand-in enters as `d_TD - d_TD.detach()` (value exactly 0,
      gradient that of d_TD = sum over unkept i of s_ti * default_i), so only the backward is
      dense. The paper describes the stand-in as filling in the missing expert outputs; LibMoE's
      port adds it to the forward (scaled 0.1). Here a model trained with it evaluates exactly
      like a top-K model of the same weights.
    - Training only: the EMA updates in training forwards that record gradients (one update
      per forward, this forward's mean included before the stand-in is formed); eval forwards
      and no-grad passes (a counting pre-pass) neither update nor add it. An expert that kept
      no token in a forward keeps its default (no observation). A forward recomputed with
      gradients (non-reentrant activation checkpointing) updates it again.
    - The default starts at 0 (as the paper's EMA), so the first forwards' stand-ins are small.
    - Its mean needs each expert's plain output, which backends do not return (they combine
      weighted outputs): it is recomputed per expert without gradient, one extra forward of the
      routed experts per training forward.
    - Variants that renormalise or scale their kept weights (mixtral, norm_topk_prob, V3's
      sigmoid gates) keep those weights for kept experts; the stand-in's weight is the raw score.
    `decay` default 0.9 (`default_moe_decay`).
    """

    expert_parallel: ClassVar[bool] = False

    def __init__(self, num_experts: int, d_model: int, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("default_output", torch.zeros(num_experts, d_model))

    @classmethod
    def from_config(cls, cfg: Any) -> DefaultMoE:
        return cls(cfg.num_experts, cfg.d_model, cfg.default_moe_decay)

    @torch.no_grad()
    def update(self, x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> None:
        """One EMA step from this forward's kept assignments."""
        for e in range(bank.num_experts):
            token_N = routing.token[routing.expert == e]
            if token_N.numel() == 0:
                continue
            mean_D = bank.expert_ffn(e, x_TD[token_N]).mean(0).to(self.default_output.dtype)
            self.default_output[e].mul_(self.decay).add_(mean_D, alpha=1 - self.decay)

    def forward(
        self, x_TD: torch.Tensor, routing: Routing, y_TD: torch.Tensor, bank: ExpertBank
    ) -> torch.Tensor:
        if not self.training or not torch.is_grad_enabled():
            return y_TD
        self.update(x_TD.detach(), routing, bank)
        unkept_TE = routing.scores * ~kept_mask(routing)
        d_TD = unkept_TE.to(y_TD.dtype) @ self.default_output.to(y_TD.dtype)
        return y_TD + (d_TD - d_TD.detach())


class SparseMixer(TopK):
    """`sparsemixer`: SparseMixer (GRIN, Liu et al. 2024, arXiv:2409.12136), Phi-3.5-MoE's
    router, on a variant whose router selects top-2 by softmax logits
    (`RouterGradConfig.no_sparsemixer` None).

    It replaces the selection and weights, not a term after the backend: `select` returns
    `variants.contract.sparsemixer.sparsemixer(logits, jitter_eps, training)`, the code the
    `phimoe` variant runs, in place of the variant's top-2 rule. Eval: each choice the argmax
    of the logits left (the top-2), its weight its softmax probability among the experts
    within a relative `2 * jitter_eps` of that best logit (1 for a choice alone in its band;
    the two need not sum to 1). Training: each choice sampled from that band's softmax, its
    forward weight times Heun's midpoint factor (1 or 0.3333) and its router gradient the
    paper's estimator. The variant keeps the rest of its routing: capacity, and its balance
    loss, whose f counts the variant's own top-K rule (`counted`), not the samples, as HF's
    loss for Phi-3.5-MoE counts the softmax's top-2 (so the loss does not depend on the
    draws); gshard's random routing of the second choice is off (SparseMixer samples it).
    The selection happens before dispatch, so every backend and expert parallelism run it;
    the output passes through here.
    """

    @staticmethod
    def select(
        cfg: Any, logits_TE: torch.Tensor, rule: Rule, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsemixer(logits_TE, cfg.jitter_eps, training)

    @staticmethod
    def counted(expert_TK: torch.Tensor, rule: Rule) -> torch.Tensor:
        """[T, K]: the variant's own top-K choices (HF's Phi-3.5-MoE loss: the softmax's top-2)."""
        return rule()[1]


def estimator_class(cfg: Any) -> type[TopK]:
    """The estimator class a config asks for (`router_grad`; `topk` where a variant has none)."""
    return ESTIMATORS[getattr(cfg, "router_grad", "topk")]


def make_estimator(cfg: Any) -> TopK:
    """The estimator a layer config asks for (`router_grad`; `topk` where a variant has none)."""
    return estimator_class(cfg).from_config(cfg)


ESTIMATORS: dict[str, type[TopK]] = {
    "topk": TopK,
    "default_moe": DefaultMoE,
    "sparsemixer": SparseMixer,
}
