"""noisy_topk against Shazeer et al. 2017 (arXiv:1701.06538, Eq. 3-7 and App. A Eq. 8-11).

The noise cannot be passed in, so the tests recover it: give one expert a noise std of ~0
(softplus(-60)), and its gate value H is its clean logit; log-score differences then give
every other expert's H exactly (softmax(H) is `Routing.scores`).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import variants
from variants.noisy_topk import cv_squared, prob_in_topk


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def layer_with(w_gate: torch.Tensor, w_noise: torch.Tensor, top_k: int) -> torch.nn.Module:
    E, D = w_gate.shape
    layer = variants.build("noisy_topk", d_model=D, num_experts=E, expert_hidden=8, top_k=top_k)
    with torch.no_grad():
        layer.router.weight.copy_(w_gate)
        layer.router.noise_weight.copy_(w_noise)
    return layer


def recovered_gates(routing: variants.Routing, quiet: int) -> torch.Tensor:
    """H from softmax(H): the `quiet` expert has no noise, so H_quiet is its clean logit."""
    log_s = routing.scores.double().log()
    return log_s - log_s[:, quiet : quiet + 1] + routing.logits.double()[:, quiet : quiet + 1]


def test_eval_is_clean_top_k_with_softmax_over_the_kept() -> None:
    logits = [[0.3, 2.0, -1.0, 1.5, 0.0], [1.0, -0.5, 0.8, 0.9, 2.2]]
    layer = layer_with(torch.tensor(logits).T, torch.zeros(5, 2), top_k=2)
    layer.eval()
    out = layer(torch.eye(2))
    assert out.losses == {} and out.aux_loss.item() == 0
    for t, row in enumerate(logits):
        a, b = sorted(range(5), key=lambda e: -row[e])[:2]
        mask = out.routing.token == t
        got = dict(zip(out.routing.expert[mask].tolist(), out.routing.weight[mask].tolist()))
        assert got.keys() == {a, b}
        assert got[a] == pytest.approx(1 / (1 + math.exp(row[b] - row[a])), rel=1e-6)
    again = layer(torch.eye(2))
    assert torch.equal(out.y, again.y)
    torch.testing.assert_close(out.routing.scores, torch.softmax(torch.tensor(logits), -1))


@pytest.mark.parametrize("noise_pre", [0.0, 1.0, -1.0])  # 0.0 is the paper's zero init
def test_training_noise_is_standard_normal_times_softplus(noise_pre: float) -> None:
    # all tokens x = [1, 0]: expert 0 has std softplus(noise_pre), expert 1 has none
    N = 4000
    w_gate = torch.tensor([[0.5, 0.0], [0.2, 0.0], [-0.3, 0.0], [0.1, 0.0]])
    w_noise = torch.tensor([[noise_pre, 0.0], [-60.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    layer = layer_with(w_gate, w_noise, top_k=2)
    x = torch.zeros(N, 2)
    x[:, 0] = 1.0
    H = recovered_gates(layer.train()(x).routing, quiet=1)
    std = math.log1p(math.exp(noise_pre))
    z = ((H[:, 0] - 0.5) / std).tolist()
    assert abs(statistics.fmean(z)) < 4 / math.sqrt(N)
    assert statistics.pstdev(z) == pytest.approx(1.0, abs=0.05)
    H_eval = recovered_gates(layer.eval()(x).routing, quiet=1)
    torch.testing.assert_close(H_eval[:, 0], torch.full((N,), 0.5, dtype=torch.float64))


def test_noise_weight_starts_at_zero() -> None:
    layer = variants.build("noisy_topk", d_model=8, num_experts=4, expert_hidden=8, top_k=2)
    assert layer.router.noise_weight.shape == (4, 8)
    assert not layer.router.noise_weight.any()


def test_prob_in_topk_on_a_hand_case() -> None:
    # k = 1. Expert 0 is in the top 1, so its threshold is the best of the others (0.4);
    # experts 1 and 2 are out, so theirs is the top value 1.2.
    clean = torch.tensor([[1.0, 0.0, 0.5]])
    noisy = torch.tensor([[1.2, -0.1, 0.4]])
    std = torch.tensor([[1.0, 2.0, 0.5]])
    got = prob_in_topk(clean, noisy, std, k=1)[0].tolist()
    expected = [phi((1.0 - 0.4) / 1.0), phi((0.0 - 1.2) / 2.0), phi((0.5 - 1.2) / 0.5)]
    assert got == pytest.approx(expected, rel=1e-6)


def test_cv_squared_is_population_variance_over_mean_squared() -> None:
    values = [1.0, 2.0, 3.0, 6.0]
    expected = statistics.pvariance(values) / statistics.fmean(values) ** 2
    assert cv_squared(torch.tensor(values)).item() == pytest.approx(expected)


def test_importance_and_load_losses_match_the_paper() -> None:
    T, E, D, K = 24, 5, 6, 2
    x = torch.randn(T, D)
    x[:, 0] = 1.0  # a constant feature gives expert E-1 a noise std of softplus(-60) ~ 0
    w_noise = torch.randn(E, D) * 0.3
    w_noise[-1] = 0.0
    w_noise[-1, 0] = -60.0
    layer = layer_with(torch.randn(E, D) * 0.7, w_noise, top_k=K)
    out = layer.train()(x)
    H = recovered_gates(out.routing, quiet=E - 1).tolist()
    clean = (x.double() @ layer.router.weight.double().T).tolist()
    std = torch.nn.functional.softplus(x.double() @ w_noise.double().T).tolist()
    importance = [0.0] * E
    load = [0.0] * E
    for t in range(T):
        top = sorted(range(E), key=lambda e: -H[t][e])[:K]
        z = sum(math.exp(H[t][e]) for e in top)
        for e in top:  # G(x) = softmax over the kept H (Eq. 3-5)
            importance[e] += math.exp(H[t][e]) / z
        for i in range(E):  # P(x, i) with kth_excluding (Eq. 9)
            others = sorted((H[t][j] for j in range(E) if j != i), reverse=True)
            load[i] += phi((clean[t][i] - others[K - 1]) / std[t][i])
    cv2 = [statistics.pvariance(v) / statistics.fmean(v) ** 2 for v in (importance, load)]
    assert out.losses.keys() == {"importance", "load"}
    assert out.losses["importance"].item() == pytest.approx(0.1 * cv2[0], rel=1e-4)
    assert out.losses["load"].item() == pytest.approx(0.1 * cv2[1], rel=1e-4)


def test_load_loss_trains_the_noise_weights() -> None:
    layer = variants.build("noisy_topk", d_model=8, num_experts=4, expert_hidden=8, top_k=2)
    with torch.no_grad():
        layer.router.noise_weight.normal_()
    layer.train()(torch.randn(16, 8)).losses["load"].backward()
    assert layer.router.noise_weight.grad.abs().sum() > 0


def test_dropless_k_per_token() -> None:
    layer = variants.build("noisy_topk", d_model=8, num_experts=6, expert_hidden=8, top_k=3)
    routing = layer.train()(torch.randn(10, 8)).routing
    assert torch.equal(routing.demand, routing.load) and routing.capacity is None
    assert torch.bincount(routing.token, minlength=10).tolist() == [3] * 10


def test_paper_defaults() -> None:
    cfg = variants.make_config("noisy_topk")
    assert (cfg.num_experts, cfg.top_k, cfg.importance_coef, cfg.load_coef) == (32, 4, 0.1, 0.1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_experts=4, top_k=4), "top_k=4 must be < num_experts=4"),
        (dict(capacity_factor=1.0), "capacity_factor=1.0 must be None"),
        (dict(load_coef=-0.1), "load_coef=-0.1"),
    ],
)
def test_invalid_fields_raise_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("noisy_topk", d_model=8, expert_hidden=8, **fields)
