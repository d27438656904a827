"""remoe against Wang et al. 2025 (arXiv:2412.14711, Eq. 4-9): ReLU gates, the refined L1
regulariser, and the adaptive coefficient over several optimizer steps."""

from __future__ import annotations

import pytest
import torch

import variants
from variants.compute.assignments import experts_per_token_stats
from variants.remoe import next_l1_coef

from .helpers import with_logits

LOGITS = [[1.0, -2.0, 0.5, -0.1], [-1.0, -1.0, -1.0, -1.0], [0.2, 0.3, -0.4, 2.0]]


def test_gates_are_relu_and_a_token_may_take_no_expert() -> None:
    layer, x = with_logits("remoe", torch.tensor(LOGITS))
    r = layer.eval()(x).routing
    got = {(t, e): w for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist())}
    assert got == pytest.approx({(0, 0): 1.0, (0, 2): 0.5, (2, 0): 0.2, (2, 1): 0.3, (2, 3): 2.0})
    assert experts_per_token_stats(r) == pytest.approx({"mean": 5 / 3, "min": 0.0, "max": 3.0})
    torch.testing.assert_close(r.scores, torch.tensor(LOGITS).clamp_min(0))


def test_refined_l1_by_hand() -> None:
    layer, x = with_logits("remoe", torch.tensor(LOGITS), top_k=1)
    layer.router.l1_coef.fill_(0.5)
    loss = layer.train()(x).losses["balance"]
    # active tokens per expert [2, 1, 1, 1]; f = E/(K T) * count = 4/3 * count
    f = torch.tensor([2.0, 1.0, 1.0, 1.0]) * 4 / 3
    gates = torch.tensor(LOGITS).clamp_min(0)
    assert loss.item() == pytest.approx(0.5 * float((gates * f).sum(-1).mean()), rel=1e-6)


def test_plain_l1_without_refinement() -> None:
    layer, x = with_logits("remoe", torch.tensor(LOGITS), balance_refinement=False)
    layer.router.l1_coef.fill_(2.0)
    loss = layer.train()(x).losses["balance"]
    assert loss.item() == pytest.approx(2.0 * (1.5 + 0 + 2.5) / 3, rel=1e-6)


def test_update_rule_over_several_steps() -> None:
    """Target 1 - K/E = 0.75. LOGITS has 5 of 12 active: sparsity 7/12 < 0.75, so lambda
    grows by alpha = 1.2 per step; an all-negative batch (sparsity 1) shrinks it."""
    layer, x = with_logits("remoe", torch.tensor(LOGITS), top_k=1)
    layer.train()
    expected = 1e-8
    for _ in range(3):
        layer(x)
        layer(x)  # two micro-batches in one step: one update
        layer.update_bias()
        expected *= 1.2
        assert layer.router.l1_coef.item() == pytest.approx(expected, rel=1e-12)
    with torch.no_grad():
        layer.router.weight.fill_(-1.0)
    layer(x)
    layer.update_bias()
    assert layer.router.l1_coef.item() == pytest.approx(expected / 1.2, rel=1e-12)
    layer.update_bias()  # no training forward since: nothing to update from
    assert layer.router.l1_coef.item() == pytest.approx(expected / 1.2, rel=1e-12)


def test_eval_forwards_change_no_state() -> None:
    layer, x = with_logits("remoe", torch.tensor(LOGITS))
    layer.eval()(x)
    layer.update_bias()
    assert layer.router.l1_coef.item() == 1e-8
    assert layer.router.active_count.item() == 0


def test_next_coef_at_target_stays() -> None:
    assert next_l1_coef(1.0, 1.2, 0.75, 0.75) == 1.0
    assert next_l1_coef(1.0, 1.2, 0.75, 0.9) == pytest.approx(1 / 1.2)


def test_coef_stays_float64_when_layer_is_cast() -> None:
    layer = variants.build("remoe", d_model=8, expert_hidden=8).to(torch.bfloat16)
    assert layer.router.l1_coef.dtype == torch.float64


def test_defaults_are_the_papers() -> None:
    cfg = variants.make_config("remoe")
    assert (cfg.l1_coef_init, cfg.l1_coef_rate, cfg.balance_refinement) == (1e-8, 1.2, True)
    assert cfg.target_sparsity == 1 - cfg.top_k / cfg.num_experts


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"l1_coef_init": 0}, "l1_coef_init=0 must be > 0"),
        ({"l1_coef_rate": 1.0}, r"l1_coef_rate=1.0 must be > 1"),
        ({"balance_refinement": 1}, "balance_refinement=1 must be true or false"),
        ({"capacity_factor": 1.0}, "capacity_factor=1.0 must be None"),
        ({"backend": "megablocks"}, "ReLU routing gives a token 0..E experts"),
    ],
)
def test_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("remoe", **fields)
