"""xmoe against Chi et al. 2022 (arXiv:2204.09179, Sec. 3, Eq. 6-7): low-dim projection,
L2-normalised cosine scores over a learnable temperature."""

from __future__ import annotations

import pytest
import torch

import variants


def hand_layer(**fields) -> torch.nn.Module:
    """D = R = 2, W = I, e_0 = (1, 0), e_1 = (0, 2) (normalised to (0, 1)), tau = 0.5."""
    layer = variants.build(
        "xmoe", d_model=2, num_experts=2, expert_hidden=4, routing_dim=2, **fields
    )
    with torch.no_grad():
        layer.router.proj.copy_(torch.eye(2))
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        layer.router.temperature.fill_(0.5)
    return layer


def test_scores_are_cosines_over_temperature() -> None:
    layer = hand_layer()
    r = layer.eval()(torch.tensor([[3.0, 4.0], [30.0, 40.0], [-1.0, 0.0]])).routing
    expected = torch.tensor([[0.6, 0.8], [0.6, 0.8], [-1.0, 0.0]]) / 0.5
    torch.testing.assert_close(r.logits, expected)
    torch.testing.assert_close(r.scores, torch.softmax(expected, -1))
    assert r.expert.tolist() == [1, 1, 1]
    torch.testing.assert_close(r.weight, r.scores[:, 1])


def test_temperature_and_projection_learn() -> None:
    """Gradients reach tau, W and e, and tau's is the loss's derivative (central difference in
    float64; a small change of tau rescales the scores and keeps every top-1 choice)."""
    layer = hand_layer(router_dtype="float64").double().train()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        out = layer(x)
        return out.y.sum() + out.aux_loss

    loss().backward()
    router = layer.router
    assert router.proj.grad.abs().sum() > 0 and router.weight.grad.abs().sum() > 0
    h = 1e-6
    with torch.no_grad():
        router.temperature += h
        up = loss()
        router.temperature -= 2 * h
        down = loss()
        router.temperature += h
    numeric = float(up - down) / (2 * h)
    assert abs(numeric) > 1e-3
    assert router.temperature.grad.item() == pytest.approx(numeric, rel=1e-5)


def test_balance_loss_by_hand() -> None:
    """Eq. 8: P_i from softmax(cos / tau0) with the fixed tau0 = 0.3, not the gate's tau."""
    layer = hand_layer()
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    out = layer.train()(x)
    cos = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    probs = torch.softmax(cos / 0.3, -1)
    f = torch.tensor([0.5, 0.5])  # token 0 -> expert 1, token 1 -> expert 0
    expected = 0.01 * 2 * float((f * probs.mean(0)).sum())
    assert out.losses["balance"].item() == pytest.approx(expected, rel=1e-6)
    # the fixed tau0 keeps the balance loss from pulling the learnable temperature
    layer.zero_grad()
    out.losses["balance"].backward()
    assert layer.router.temperature.grad is None or layer.router.temperature.grad.item() == 0


def test_defaults_and_shapes() -> None:
    layer = variants.build("xmoe", d_model=32)
    assert layer.router.proj.shape == (16, 32)
    assert layer.router.weight.shape == (8, 16)
    assert layer.router.temperature.item() == pytest.approx(0.07)
    assert layer.cfg.top_k == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"routing_dim": 0}, "routing_dim=0 must be >= 1"),
        ({"init_temperature": 0}, "init_temperature=0 must be > 0"),
        ({"balance_temperature": -1}, "balance_temperature=-1 must be > 0"),
        ({"balance_coef": -0.1}, "balance_coef=-0.1 must be >= 0"),
    ],
)
def test_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("xmoe", **fields)
