"""topp against Huang et al. 2024 (arXiv:2403.07652, Eq. 1-7) on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch

import variants
from variants.compute.assignments import experts_per_token_stats
from variants.topp import top_p_mask

from .helpers import with_logits

PROBS = [[0.5, 0.3, 0.15, 0.05]]


@pytest.mark.parametrize(
    ("p", "kept"), [(0.4, {0}), (0.5, {0}), (0.6, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2})]
)
def test_fewest_experts_whose_mass_reaches_p(p: float, kept: set[int]) -> None:
    mask = top_p_mask(torch.tensor(PROBS), p)
    assert set(mask[0].nonzero().flatten().tolist()) == kept


def test_unsorted_rows_and_p_one_keeps_every_expert_with_mass() -> None:
    probs = torch.tensor([[0.05, 0.15, 0.5, 0.3]])
    assert top_p_mask(probs, 0.6)[0].tolist() == [False, False, True, True]
    assert top_p_mask(probs, 1.0)[0].all()


def test_weights_are_the_probabilities_not_renormalised() -> None:
    logits = torch.log(torch.tensor([PROBS[0], [0.25, 0.25, 0.25, 0.25]]))
    layer, x = with_logits("topp", logits, top_p=0.6)
    r = layer.eval()(x).routing
    got = {(t, e): w for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist())}
    assert got.keys() == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    assert got[(0, 0)] == pytest.approx(0.5) and got[(0, 1)] == pytest.approx(0.3)
    assert got[(1, 2)] == pytest.approx(0.25)
    assert experts_per_token_stats(r) == {"mean": 2.5, "min": 2.0, "max": 3.0}


def test_balance_and_dynamic_losses_by_hand() -> None:
    probs = torch.tensor([PROBS[0], [0.25, 0.25, 0.25, 0.25]])
    layer, x = with_logits("topp", torch.log(probs), top_p=0.6)
    losses = layer.train()(x).losses
    # demand: token 0 -> {0, 1}; token 1 -> {0, 1, 2}: f = [2, 2, 1, 0] / 5
    f = torch.tensor([2.0, 2.0, 1.0, 0.0]) / 5
    q = probs.mean(0)
    assert losses["balance"].item() == pytest.approx(1e-2 * 4 * float((f * q).sum()), rel=1e-5)
    entropy = -sum(p * math.log(p) for p in PROBS[0]) + math.log(4)
    assert losses["z"].item() == pytest.approx(1e-4 * entropy / 2, rel=1e-5)


def test_a_confident_token_takes_one_expert() -> None:
    layer, x = with_logits("topp", torch.tensor([[9.0, 0.0, 0.0, 0.0]]))
    r = layer.eval()(x).routing
    assert r.expert.tolist() == [0]


def test_defaults_are_the_papers() -> None:
    cfg = variants.make_config("topp")
    assert (cfg.top_p, cfg.balance_coef, cfg.dynamic_coef) == (0.4, 1e-2, 1e-4)
    assert cfg.variable_k


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_p": 0}, "top_p=0 must be > 0"),
        ({"top_p": 1.5}, "top_p=1.5 must be <= 1"),
        ({"balance_coef": -1}, "balance_coef=-1 must be >= 0"),
        ({"dynamic_coef": float("nan")}, "dynamic_coef=nan must be a finite number"),
        ({"capacity_factor": 1.0}, "capacity_factor=1.0 must be None"),
        ({"backend": "megablocks"}, "top-p routing gives a token 1..E experts"),
    ],
)
def test_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("topp", **fields)
