"""mixtral against Jiang et al. 2024 (arXiv:2401.04088, Eq. 1-2) and the contract's balance form."""

from __future__ import annotations

import math

import pytest
import torch

import variants

from .helpers import with_logits

HAND_LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 2.5, 1.0], [1.0, 1.5, -2.0, 0.2]]


def test_top2_with_weights_renormalised_over_the_two() -> None:
    layer, x = with_logits("mixtral", torch.tensor(HAND_LOGITS))
    routing = layer.eval()(x).routing
    for t, row in enumerate(HAND_LOGITS):
        a, b = sorted(range(4), key=lambda e: -row[e])[:2]
        mask = routing.token == t
        got = dict(zip(routing.expert[mask].tolist(), routing.weight[mask].tolist(), strict=True))
        denominator = math.exp(row[a]) + math.exp(row[b])
        assert got.keys() == {a, b}
        assert got[a] == pytest.approx(math.exp(row[a]) / denominator, rel=1e-6)
        assert got[b] == pytest.approx(math.exp(row[b]) / denominator, rel=1e-6)


def test_dropless_every_token_keeps_two_experts() -> None:
    layer, x = with_logits("mixtral", torch.randn(16, 4) * 3)
    routing = layer.train()(x).routing
    assert torch.equal(routing.demand, routing.load)
    assert torch.bincount(routing.token, minlength=16).tolist() == [2] * 16
    assert routing.capacity is None


def test_balance_is_contract_normalised_and_k_times_smaller_than_hf() -> None:
    T, E, K = 20, 4, 2
    logits = torch.randn(T, E) * 2
    layer, x = with_logits("mixtral", logits)
    loss = layer.train()(x).losses["balance"].item()
    probs = torch.softmax(logits, -1)
    chosen = [sorted(range(E), key=lambda e: -row[e])[:K] for row in logits.tolist()]
    f = [sum(i in c for c in chosen) / (T * K) for i in range(E)]
    p = probs.mean(0).tolist()
    assert loss == pytest.approx(0.01 * E * sum(fi * pi for fi, pi in zip(f, p, strict=True)))
    # HF transformers' load_balancing_loss_func: mean over tokens of the [T, K, E] one-hot,
    # times the mean probability, summed over K and E, times E.
    one_hot_TKE = torch.nn.functional.one_hot(torch.tensor(chosen), E).float()
    hf = (one_hot_TKE.mean(0) * probs.mean(0)).sum().item() * E
    assert hf == pytest.approx(K * loss / 0.01, rel=1e-5)


def test_balance_is_one_times_coef_under_perfect_balance() -> None:
    # each expert chosen equally often (f_i = 1/E) makes the loss coef * sum_i P_i = coef
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0]])
    layer, x = with_logits("mixtral", logits, balance_coef=0.5)
    assert layer.train()(x).losses["balance"].item() == pytest.approx(0.5)


def test_eval_has_no_losses_and_is_deterministic() -> None:
    layer, x = with_logits("mixtral", torch.randn(8, 4))
    layer.eval()
    a, b = layer(x), layer(x)
    assert a.losses == {} and a.aux_loss.item() == 0
    assert torch.equal(a.y, b.y) and torch.equal(a.routing.expert, b.routing.expert)


def test_defaults_and_capacity_factor_rejected() -> None:
    cfg = variants.make_config("mixtral")
    assert (cfg.num_experts, cfg.top_k, cfg.balance_coef, cfg.capacity_factor) == (8, 2, 0.01, None)
    with pytest.raises(ValueError, match=r"capacity_factor=1.25 must be None"):
        variants.build("mixtral", d_model=8, expert_hidden=8, capacity_factor=1.25)
