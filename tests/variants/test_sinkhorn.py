"""sinkhorn against S-BASE (Clark et al. 2022, arXiv:2202.01169) in Megatron-Core's form:
Sinkhorn-balanced selection in training, plain top-k in eval, sigmoid/softmax weights."""

from __future__ import annotations

import pytest
import torch

import variants
from variants.sinkhorn import sinkhorn

from .helpers import with_logits

# every token prefers expert 0: plain top-1 sends all four there
SKEWED = [[2.0, 0.0], [1.9, 0.0], [1.8, 0.0], [1.7, 0.0]]


def test_plan_rows_and_columns_are_balanced() -> None:
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(0)) * 2
    plan = sinkhorn(logits, tol=1e-8)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 1 / 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((12,), 1 / 12), atol=1e-4, rtol=0)


def test_training_balances_where_top1_would_not() -> None:
    layer, x = with_logits("sinkhorn", torch.tensor(SKEWED))
    assert layer.train()(x).routing.load.tolist() == [2, 2]
    assert layer.eval()(x).routing.load.tolist() == [4, 0]


def test_training_keeps_the_tokens_that_prefer_each_expert_most() -> None:
    layer, x = with_logits("sinkhorn", torch.tensor(SKEWED))
    r = layer.train()(x).routing
    # the plan ranks tokens by their relative preference: the strongest keep expert 0
    assert r.expert.tolist() == [0, 0, 1, 1]


def test_weights_sigmoid_for_top1_softmax_for_topk() -> None:
    logits = torch.tensor(SKEWED)
    layer, x = with_logits("sinkhorn", logits)
    r = layer.train()(x).routing
    torch.testing.assert_close(r.weight, torch.sigmoid(logits)[r.token, r.expert])
    layer, x = with_logits("sinkhorn", logits, top_k=2)
    r = layer.train()(x).routing
    torch.testing.assert_close(r.weight, torch.softmax(logits, -1)[r.token, r.expert])


def test_no_auxiliary_loss_and_plan_carries_no_gradient() -> None:
    layer, x = with_logits("sinkhorn", torch.tensor(SKEWED))
    out = layer.train()(x)
    assert out.losses == {} and out.aux_loss.item() == 0.0
    out.y.sum().backward()
    assert layer.router.weight.grad is not None  # through the sigmoid weights


def test_max_iters_bounds_the_loop() -> None:
    plan = sinkhorn(torch.tensor(SKEWED), tol=0.0, max_iters=3)
    assert torch.isfinite(plan).all()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sinkhorn_tol": 0}, "sinkhorn_tol=0 must be > 0"),
        ({"sinkhorn_max_iters": 0}, "sinkhorn_max_iters=0 must be >= 1"),
        ({"top_k": 9}, "top_k=9 must be <= num_experts=8"),
    ],
)
def test_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("sinkhorn", **fields)
