"""docs/contract.md §4 statistics on hand-built loads and routings (moe_bench.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_bench.metrics import (
    dead_experts,
    drop_fraction,
    load_cv,
    load_entropy,
    max_vio,
    router_entropy,
    routing_stats,
    unrouted_fraction,
    window_stats,
)
from tests.variants.helpers import hand_routing


@pytest.mark.parametrize(
    ("load", "entropy", "vio", "cv", "dead"),
    [
        ([5, 5, 5, 5], 1.0, 0.0, 0.0, 0),
        ([20, 0, 0, 0], 0.0, 3.0, math.sqrt(3), 3),
        # p = (1/2, 1/4, 1/4, 0): H = 1.5 bits, / 2 bits; max_vio = 4/2 - 1; std/mean by hand
        ([2, 1, 1, 0], 0.75, 1.0, math.sqrt(0.5) / 1.0, 1),
    ],
)
def test_load_statistics_by_hand(load, entropy, vio, cv, dead) -> None:
    load_E = torch.tensor(load)
    assert load_entropy(load_E) == pytest.approx(entropy)
    assert max_vio(load_E) == pytest.approx(vio)
    assert load_cv(load_E) == pytest.approx(cv)
    assert dead_experts(load_E) == dead


def test_dead_threshold_is_one_percent_of_mean() -> None:
    # mean = 1000, threshold 10: 9 is dead, 10 is not
    assert dead_experts(torch.tensor([3890, 10, 9, 91])) == 1


def test_empty_and_single_expert_loads() -> None:
    assert math.isnan(load_entropy(torch.tensor([0, 0])))
    assert load_entropy(torch.tensor([7])) == 1.0
    assert max_vio(torch.tensor([7])) == 0.0


def test_drops_and_unrouted() -> None:
    # 4 tokens, 2 experts; token 3 kept nothing, token 2 kept one of two
    r = hand_routing(
        token=[0, 1, 2], expert=[0, 1, 0], weight=[1, 1, 1], num_tokens=4, num_experts=2
    )
    r.demand = torch.tensor([3, 3])
    assert drop_fraction(r.demand, r.load) == pytest.approx(0.5)
    assert unrouted_fraction(r) == pytest.approx(0.25)


def test_router_entropy_uniform_and_confident() -> None:
    E = 8
    assert router_entropy(torch.full((5, E), 1.0 / E)) == pytest.approx(math.log(E))
    assert router_entropy(torch.eye(E)) == pytest.approx(0.0)
    # sigmoid scores are normalised first: a constant row is uniform whatever its level
    assert router_entropy(torch.full((3, E), 0.9)) == pytest.approx(math.log(E))


def test_window_pools_loads_and_weighs_tokens() -> None:
    a = hand_routing([0, 1], [0, 0], [1, 1], num_tokens=2, num_experts=2)
    b = hand_routing([0, 1, 2, 3], [1, 1, 1, 1], [1] * 4, num_tokens=4, num_experts=2)
    b.scores = torch.tensor([[1.0, 0.0]] * 4)  # entropy 0 on b's tokens, log 2 on a's
    stats = window_stats([a, b])
    assert stats["load_entropy"] == pytest.approx(load_entropy(torch.tensor([2, 4])))
    assert stats["router_entropy"] == pytest.approx(2 * math.log(2) / 6)
    assert routing_stats(a)["max_vio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        window_stats([])
