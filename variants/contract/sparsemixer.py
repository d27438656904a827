"""SparseMixer: top-2 selection with a jitter threshold and its Heun's-method gradient
estimator (GRIN, Liu et al. 2024, arXiv:2409.12136), as HF transformers implements it for
Phi-3.5-MoE (transformers 5.25, models/phimoe/modeling_phimoe.py: `sparsemixer`,
`PhimoeMultiplier`). One home for the math, so any router can use it.

Shape legend: T tokens, E experts.

Per token, twice (the second time with the first choice masked out to -inf):
1. threshold mask: experts whose relative gap to the current best score,
   (max - s_e) / max(|s_e|, max), exceeds 2 * jitter_eps are masked to -inf;
2. choice: eval takes the argmax; training samples from softmax of the masked scores
   (Gumbel-max: argmax of masked - log(Exp(1)));
3. weight: the chosen expert's probability under the softmax of the masked scores;
4. training only: the weight's forward value is multiplied by 1 when the sample is the
   masked softmax's argmax or, otherwise, with probability 1/4, else by 0.3333 (HF's
   `torch.add(0.3333, mask, alpha=0.6667)`, its approximation of 1/3): the midpoint of
   Heun's third-order method. Its gradient bypasses the softmax and is given by
   `SparseMixerGrad`: with g the incoming gradient times the weight, d scores =
   g * (onehot(choice) - softmax(masked scores)). The mid-point factor is not
   differentiated (HF returns no gradient for it).
Follows HF's code, which is what the released Phi-3.5-MoE weights were trained with;
the random draws are made in HF's order (an extra `uniform_` in the second pass included), so
under one seed this function and HF's give the same choices, weights and gradients.
HF's `top_k` argument is unused there (always two); here there is none.
"""

from __future__ import annotations

import torch


class SparseMixerGrad(torch.autograd.Function):
    """HF's `PhimoeMultiplier`: forward `weight * midpoint`; backward to the scores only,
    `g = grad * weight`, `d scores = onehot(choice) * g - softmax(masked) * g`."""

    @staticmethod
    def forward(ctx, scores_TE, weight_T1, choice_T1, probs_TE, midpoint_T1):  # type: ignore[override]
        ctx.save_for_backward(weight_T1, choice_T1, probs_TE)
        return weight_T1 * midpoint_T1

    @staticmethod
    def backward(ctx, grad_T1):  # type: ignore[override]
        weight_T1, choice_T1, probs_TE = ctx.saved_tensors
        grad_T1 = grad_T1 * weight_T1
        grad_TE = probs_TE * grad_T1.mul(-1)
        grad_TE.scatter_add_(dim=-1, index=choice_T1, src=grad_T1)
        return grad_TE, None, None, None, None


def threshold_mask(
    scores_TE: torch.Tensor, best_T1: torch.Tensor, jitter_eps: float
) -> torch.Tensor:
    """Bool [T, E]: experts too far below the best, `(best - s) / max(|s|, best) > 2 eps`."""
    with torch.no_grad():
        factor_TE = scores_TE.abs().clamp(min=best_T1)
        return ((best_T1 - scores_TE) / factor_TE) > (2 * jitter_eps)


def one_choice(
    scores_TE: torch.Tensor,
    masked_TE: torch.Tensor,
    best_T1: torch.Tensor,
    argmax_T1: torch.Tensor,
    jitter_eps: float,
    training: bool,
    second: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SparseMixer pass: (weight [T, 1], choice [T, 1]) among `masked_TE` (the scores, with
    earlier choices at -inf), thresholded against `best_T1` (its max, found at `argmax_T1`)."""
    gates_TE = masked_TE.masked_fill(threshold_mask(scores_TE, best_T1, jitter_eps), float("-inf"))
    if training:  # Gumbel-max sampling from softmax(gates)
        noise_TE = torch.empty_like(gates_TE, memory_format=torch.legacy_contiguous_format)
        choice_T1 = (gates_TE - noise_TE.exponential_().log()).max(dim=-1)[1].unsqueeze(-1)
    else:
        choice_T1 = argmax_T1
    probs_TE = torch.softmax(gates_TE, dim=-1)
    weight_T1 = probs_TE.gather(dim=-1, index=choice_T1)
    if not training:
        return weight_T1, choice_T1
    top_T1, top_ind_T1 = probs_TE.max(dim=-1, keepdim=True)
    coin_T1 = torch.rand_like(top_T1)
    if second:
        coin_T1 = coin_T1.uniform_()  # HF's second pass draws twice; kept for equal streams
    midpoint_T1 = torch.logical_or(choice_T1 == top_ind_T1, coin_T1 > 0.75)
    midpoint_T1 = torch.add(0.3333, midpoint_T1, alpha=0.6667).type_as(probs_TE)
    return SparseMixerGrad.apply(scores_TE, weight_T1, choice_T1, probs_TE, midpoint_T1), choice_T1


def sparsemixer(
    scores_TE: torch.Tensor, jitter_eps: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [T, 2], expert [T, 2]): SparseMixer's two choices per token and their weights."""
    with torch.no_grad():
        best_T1, argmax_T1 = scores_TE.max(dim=-1, keepdim=True)
    w1_T1, e1_T1 = one_choice(scores_TE, scores_TE, best_T1, argmax_T1, jitter_eps, training, False)
    masked_TE = torch.scatter(scores_TE, -1, e1_T1, float("-inf"))  # the first choice out
    with torch.no_grad():
        best_T1, argmax_T1 = masked_TE.max(dim=-1, keepdim=True)
    w2_T1, e2_T1 = one_choice(scores_TE, masked_TE, best_T1, argmax_T1, jitter_eps, training, True)
    return torch.cat((w1_T1, w2_T1), dim=-1), torch.cat((e1_T1, e2_T1), dim=-1)
