"""deepseek_v2 against DeepSeek-V2 (arXiv:2405.04434, Sec. 2.2), written from the equations.

Device-limited routing (at most M devices per token), softmax combine weights, training-only
device-level dropping of the lowest-affinity assignments, and the three per-sequence losses.
"""

from __future__ import annotations

import math

import pytest
import torch

import variants

from .helpers import with_logits


def expected_experts(scores: list[float], num_devices: int, max_devices: int, k: int) -> set[int]:
    """Sec. 2.2.2 by hand: the M devices with the best single expert, then top-K inside them."""
    size = len(scores) // num_devices
    best = sorted(range(num_devices), key=lambda d: -max(scores[d * size : (d + 1) * size]))
    allowed = [e for e in range(len(scores)) if e // size in best[:max_devices]]
    return set(sorted(allowed, key=lambda e: -scores[e])[:k])


def experts_of(routing: variants.Routing, t: int) -> set[int]:
    return set(routing.expert[routing.token == t].tolist())


def test_device_limit_changes_the_choice_on_a_hand_case() -> None:
    # groups {0,1} {2,3} {4,5}; unconstrained top-3 is {0, 2, 4} over 3 devices, but only the
    # 2 devices with the best experts (0 and 1) are allowed, so the third pick is expert 3.
    logits = torch.tensor([[5.0, 0.0, 4.9, 1.0, 4.8, 0.0]])
    layer, x = with_logits(
        "deepseek_v2", logits, top_k=3, num_devices=3, max_devices=2, num_shared_experts=0
    )
    routing = layer.eval()(x).routing
    assert experts_of(routing, 0) == {0, 2, 3}
    scores = torch.softmax(logits[0], -1)
    for e, w in zip(routing.expert.tolist(), routing.weight.tolist(), strict=True):
        assert w == pytest.approx(scores[e].item(), rel=1e-6)  # softmax score, not renormalised


@pytest.mark.parametrize(
    ("num_experts", "num_devices", "max_devices", "top_k"),
    [(12, 4, 2, 3), (8, 8, 3, 3), (16, 4, 1, 4), (6, 2, 2, 2)],
)
def test_never_more_than_max_devices_and_top_k_inside_them(
    num_experts: int, num_devices: int, max_devices: int, top_k: int
) -> None:
    T = 48
    logits = torch.randn(T, num_experts) * 2
    layer, x = with_logits(
        "deepseek_v2",
        logits,
        top_k=top_k,
        num_devices=num_devices,
        max_devices=max_devices,
        num_shared_experts=0,
    )
    routing = layer.eval()(x).routing
    scores = torch.softmax(logits, -1)
    size = num_experts // num_devices
    for t in range(T):
        chosen = experts_of(routing, t)
        assert len({e // size for e in chosen}) <= max_devices
        assert chosen == expected_experts(scores[t].tolist(), num_devices, max_devices, top_k)
    assert torch.equal(routing.load, routing.demand)  # eval never drops


def _over_budget_case() -> tuple[torch.Tensor, dict]:
    """8 tokens, top-1, 2 devices {0,1} {2,3}: budget ceil(1.0 * 1 * 8 / 2) = 4 per device.

    Tokens 0-5 ask expert 0 with affinities ordered by a = 1, 3, 2, 5, 4, 0.5; tokens 6-7 ask
    expert 2. Device 0 is asked 6 times, so it keeps the 4 highest: tokens 3, 4, 1, 2.
    """
    a = [1.0, 3.0, 2.0, 5.0, 4.0, 0.5]
    rows = [[ai, 0.0, 0.0, 0.0] for ai in a] + [[0.0, 0.0, 3.0, 0.0]] * 2
    fields = dict(top_k=1, num_devices=2, max_devices=1, num_shared_experts=0)
    return torch.tensor(rows), fields


def test_training_drops_lowest_affinity_on_an_over_full_device() -> None:
    logits, fields = _over_budget_case()
    layer, x = with_logits("deepseek_v2", logits, **fields)
    out = layer.train()(x)
    routing = out.routing
    assert sorted(routing.token[routing.expert == 0].tolist()) == [1, 2, 3, 4]
    assert sorted(routing.token[routing.expert == 2].tolist()) == [6, 7]
    assert routing.demand.tolist() == [6, 0, 2, 0]
    assert routing.load.tolist() == [4, 0, 2, 0]
    assert routing.capacity is None  # the budget is per device, not per expert
    assert not out.y[[0, 5]].any()  # dropped and no shared experts: zero output
    assert out.y[[1, 2, 3, 4, 6, 7]].abs().sum(-1).gt(0).all()


def test_eval_keeps_every_assignment_even_over_budget() -> None:
    logits, fields = _over_budget_case()
    layer, x = with_logits("deepseek_v2", logits, **fields)
    out = layer.eval()(x)
    assert out.routing.load.tolist() == [6, 0, 2, 0]
    assert out.losses == {} and out.aux_loss.item() == 0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_dropping_keeps_highest_affinity_within_each_device_budget(capacity_factor: float) -> None:
    T, E, V, M, K = 40, 8, 4, 2, 3
    logits = torch.randn(T, E) * 2
    logits[:, :2] += 1.5  # device 0 is popular, so it overflows
    layer, x = with_logits(
        "deepseek_v2",
        logits,
        top_k=K,
        num_devices=V,
        max_devices=M,
        num_shared_experts=0,
        capacity_factor=capacity_factor,
    )
    kept = layer.train()(x).routing
    asked = layer.eval()(x).routing  # same selection, nothing dropped
    budget = math.ceil(capacity_factor * K * T / V)
    scores = torch.softmax(logits, -1)
    kept_pairs = set(zip(kept.token.tolist(), kept.expert.tolist(), strict=True))
    dropped_somewhere = False
    for d in range(V):
        on_d = [
            (t, e)
            for t, e in zip(asked.token.tolist(), asked.expert.tolist(), strict=True)
            if e // (E // V) == d
        ]
        kept_d = [p for p in on_d if p in kept_pairs]
        dropped_d = [p for p in on_d if p not in kept_pairs]
        assert len(kept_d) == min(len(on_d), budget)
        if dropped_d:
            dropped_somewhere = True
            assert min(scores[p].item() for p in kept_d) >= max(scores[p].item() for p in dropped_d)
    assert dropped_somewhere  # the case really exercises dropping
    assert kept_pairs <= set(zip(asked.token.tolist(), asked.expert.tolist(), strict=True))


def _losses_by_hand(
    scores: torch.Tensor, num_seqs: int, num_devices: int, max_devices: int, k: int
) -> dict[str, float]:
    """Eq. 12-20 with T = S, per sequence, averaged; plain Python loops over the formulas."""
    T, E = scores.shape
    S, size = T // num_seqs, E // num_devices
    totals = {"balance": 0.0, "device_balance": 0.0, "comm_balance": 0.0}
    for b in range(num_seqs):
        seq = scores[b * S : (b + 1) * S].tolist()
        chosen = [expected_experts(row, num_devices, max_devices, k) for row in seq]
        f = [E / (k * S) * sum(i in c for c in chosen) for i in range(E)]
        p = [sum(row[i] for row in seq) / S for i in range(E)]
        groups = [range(d * size, (d + 1) * size) for d in range(num_devices)]
        f1 = [sum(f[i] for i in g) / size for g in groups]
        p1 = [sum(p[i] for i in g) for g in groups]
        sends = [sum(any(i in g for i in c) for c in chosen) for g in groups]
        f2 = [num_devices / (max_devices * S) * n for n in sends]
        totals["balance"] += sum(fi * pi for fi, pi in zip(f, p, strict=True)) / num_seqs
        totals["device_balance"] += sum(a * b for a, b in zip(f1, p1, strict=True)) / num_seqs
        totals["comm_balance"] += sum(a * b for a, b in zip(f2, p1, strict=True)) / num_seqs
    return totals


@pytest.mark.parametrize("capacity_factor", [None, 0.5])  # losses count demand, before drops
def test_three_losses_per_sequence_match_the_paper(capacity_factor: float | None) -> None:
    B, S, E, V, M, K = 3, 6, 6, 3, 2, 2
    logits = torch.randn(B * S, E) * 1.5
    layer, x = with_logits(
        "deepseek_v2",
        logits,
        top_k=K,
        num_devices=V,
        max_devices=M,
        capacity_factor=capacity_factor,
    )
    out = layer.train()(x.view(B, S, B * S))
    cfg = layer.cfg
    by_hand = _losses_by_hand(torch.softmax(logits, -1), B, V, M, K)
    coef = {"balance": cfg.alpha1, "device_balance": cfg.alpha2, "comm_balance": cfg.alpha3}
    assert out.losses.keys() == by_hand.keys()
    for name, value in by_hand.items():
        assert out.losses[name].item() == pytest.approx(coef[name] * value, rel=1e-5), name
    assert out.aux_loss.item() == pytest.approx(sum(v.item() for v in out.losses.values()))


def test_losses_are_per_sequence_not_per_batch() -> None:
    # the same 12 tokens as one sequence or as two give different f (and so losses)
    logits = torch.randn(12, 6) * 2
    layer, x = with_logits("deepseek_v2", logits, top_k=2, num_devices=3, max_devices=2)
    layer.train()
    one = layer(x).losses["comm_balance"]
    two = layer(x.view(2, 6, 12)).losses["comm_balance"]
    scores = torch.softmax(logits, -1)
    assert one.item() == pytest.approx(0.02 * _losses_by_hand(scores, 1, 3, 2, 2)["comm_balance"])
    assert two.item() == pytest.approx(0.02 * _losses_by_hand(scores, 2, 3, 2, 2)["comm_balance"])


def test_paper_defaults() -> None:
    cfg = variants.make_config("deepseek_v2")
    assert (cfg.num_experts, cfg.top_k, cfg.num_shared_experts) == (160, 6, 2)
    assert (cfg.num_devices, cfg.max_devices, cfg.capacity_factor) == (8, 3, 1.0)
    assert (cfg.alpha1, cfg.alpha2, cfg.alpha3) == (0.003, 0.05, 0.02)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_experts=8, num_devices=3, max_devices=1, top_k=2), "num_experts=8"),
        (dict(num_experts=8, num_devices=4, max_devices=5, top_k=2), "max_devices=5"),
        (dict(num_experts=8, num_devices=4, max_devices=1, top_k=3), "top_k=3"),
        (dict(num_experts=8, num_devices=4, max_devices=2, top_k=2, alpha3=-1.0), "alpha3=-1.0"),
    ],
)
def test_invalid_fields_raise_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("deepseek_v2", d_model=8, expert_hidden=8, **fields)
