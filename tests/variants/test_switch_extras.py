"""Training-only extras of switch and gshard (z-loss: deepseek_moe too), from the papers.

- Router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906, Eq. 5) on switch, gshard and
  deepseek_moe.
- Multiplicative input jitter on switch (Fedus et al. 2021, Sec. 2.4).
- GShard's random second choice (Lepikhin et al. 2020, Algorithm 1): kept with probability
  min(1, 2 g2 / (g1 + g2)), checked statistically with a fixed seed.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import variants

from .helpers import with_logits

# deepseek_moe's defaults pick 7 of 63 experts: top-2 of the 4 here
FIELDS = {"switch": {}, "gshard": {}, "deepseek_moe": {"top_k": 2}}
HAND_LOGITS = [[1.0, 2.0, 0.5, -1.0], [3.0, 0.0, 0.0, 1.0], [-2.0, 0.5, 0.25, 0.0]]


def z_by_hand(rows: list[list[float]]) -> float:
    return statistics.fmean(math.log(sum(math.exp(u) for u in row)) ** 2 for row in rows)


@pytest.mark.parametrize("name", ["switch", "gshard", "deepseek_moe"])
def test_z_loss_is_mean_squared_logsumexp(name: str) -> None:
    layer, x = with_logits(name, torch.tensor(HAND_LOGITS), z_loss_coef=1e-3, **FIELDS[name])
    out = layer.train()(x)
    assert out.losses["z"].item() == pytest.approx(1e-3 * z_by_hand(HAND_LOGITS), rel=1e-6)
    assert out.aux_loss.item() == pytest.approx(
        out.losses["z"].item() + out.losses["balance"].item()
    )
    assert layer.eval()(x).losses == {}


@pytest.mark.parametrize("name", ["switch", "gshard", "deepseek_moe"])
def test_z_loss_off_by_default(name: str) -> None:
    layer, x = with_logits(name, torch.tensor(HAND_LOGITS), **FIELDS[name])
    assert layer.cfg.z_loss_coef == 0
    assert layer.train()(x).losses.keys() == {"balance"}


def test_z_loss_gradient_reaches_the_router() -> None:
    layer, x = with_logits("switch", torch.tensor(HAND_LOGITS), z_loss_coef=1.0, balance_coef=0.0)
    layer.train()(x).losses["z"].backward()
    # d/dW of mean_t lse(u_t)^2 with u_t = W x_t and x_t = e_t: column t is 2 lse_t softmax_t / T
    expected = torch.stack(
        [
            2 * math.log(sum(math.exp(u) for u in row)) * torch.softmax(torch.tensor(row), -1) / 3
            for row in HAND_LOGITS
        ],
        dim=1,
    )
    torch.testing.assert_close(layer.router.weight.grad, expected)


def _jitter_layer(jitter_eps: float) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """D = 1 and x = 1: the router sees U * w, so log(p0 / p1) = U * (w0 - w1) reveals U."""
    layer = variants.build(
        "switch",
        d_model=1,
        num_experts=3,
        expert_hidden=8,
        capacity_factor=None,
        jitter_eps=jitter_eps,
    )
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0], [-0.5], [0.2]]))
    return layer, torch.ones(3000, 1), 1.5


def _recovered_jitter(layer: torch.nn.Module, x: torch.Tensor, w_gap: float) -> torch.Tensor:
    routing = layer(x).routing
    log_p = routing.scores.double().log()
    return (log_p[:, 0] - log_p[:, 1]) / w_gap


def test_jitter_multiplies_router_input_by_uniform_noise_in_training() -> None:
    eps = 0.1
    layer, x, w_gap = _jitter_layer(eps)
    u = _recovered_jitter(layer.train(), x, w_gap)
    assert u.min() >= 1 - eps - 1e-5 and u.max() <= 1 + eps + 1e-5
    assert u.min() < 1 - 0.95 * eps and u.max() > 1 + 0.95 * eps  # it spans the interval
    # U(1 - eps, 1 + eps) has mean 1 and variance eps^2 / 3
    assert abs(u.mean().item() - 1) < 4 * eps / math.sqrt(3 * len(u))
    assert u.var().item() == pytest.approx(eps**2 / 3, rel=0.1)
    routing = layer(x).routing
    torch.testing.assert_close(routing.logits, x @ layer.router.weight.T)  # logits un-jittered


@pytest.mark.parametrize(("eps", "mode"), [(0.1, "eval"), (0.0, "train")])
def test_no_jitter_in_eval_or_by_default(eps: float, mode: str) -> None:
    layer, x, w_gap = _jitter_layer(eps)
    layer.train(mode == "train")
    u = _recovered_jitter(layer, x, w_gap)
    torch.testing.assert_close(u, torch.ones_like(u))


def _gshard_two_kinds(n: int) -> tuple[torch.nn.Module, torch.Tensor, list[float]]:
    """n tokens x = e0 and n tokens x = e1 with known top-2 probabilities.

    Kind 0, logits (2, 1, 0, 0): g2/(g1+g2) = 1/(e+1), kept with p = 2/(e+1) ~ 0.538.
    Kind 1, logits (0, -1, ln 9, -2): g2/(g1+g2) = 1/10, kept with p = 0.2.
    """
    layer = variants.build(
        "gshard", d_model=2, num_experts=4, expert_hidden=8, capacity_factor=None
    )
    with torch.no_grad():
        layer.router.weight.copy_(
            torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.0, math.log(9)], [0.0, -2.0]])
        )
    x = torch.zeros(2 * n, 2)
    x[:n, 0] = 1.0
    x[n:, 1] = 1.0
    return layer, x, [2 / (math.e + 1), 0.2]


def test_gshard_second_choice_is_kept_at_the_formula_rate() -> None:
    n = 3000
    layer, x, rates = _gshard_two_kinds(n)
    routing = layer.train()(x).routing
    kept_second_T = torch.bincount(routing.token, minlength=2 * n) - 1
    for kind, p in enumerate(rates):
        observed = kept_second_T[kind * n : (kind + 1) * n].float().mean().item()
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n), (kind, observed, p)
    # demand counts after the draw: first choices plus the kept second choices
    assert routing.demand.sum().item() == 2 * n + kept_second_T.sum().item()
    # a kept second choice keeps its weight g2 / (g1 + g2): the draw does not rescale it
    second = routing.weight[routing.token >= n].min().item()
    assert second == pytest.approx(0.1, rel=1e-5)


def test_gshard_eval_keeps_every_second_choice() -> None:
    layer, x, _ = _gshard_two_kinds(200)
    routing = layer.eval()(x).routing
    assert torch.bincount(routing.token, minlength=400).tolist() == [2] * 400
