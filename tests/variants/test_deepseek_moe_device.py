"""deepseek_moe's device-level balance loss (Dai et al. 2024, arXiv:2401.06066, Eq. 15-17).

`alpha2 * sum_d f'_d P'_d` over `num_devices` contiguous expert groups, f'_d the mean of
f_i = E/(K T) * #tokens choosing i over group d, P'_d the sum of P_i = mean_t s_{i,t} over d.
"""

from __future__ import annotations

import pytest
import torch

import variants

from .helpers import with_logits


def device_loss_by_hand(scores: torch.Tensor, k: int, num_devices: int) -> float:
    T, E = scores.shape
    size = E // num_devices
    rows = scores.tolist()
    chosen = [sorted(range(E), key=lambda e: -row[e])[:k] for row in rows]
    f = [E / (k * T) * sum(i in c for c in chosen) for i in range(E)]
    p = [sum(row[i] for row in rows) / T for i in range(E)]
    total = 0.0
    for d in range(num_devices):
        group = range(d * size, (d + 1) * size)
        total += sum(f[i] for i in group) / size * sum(p[i] for i in group)
    return total


def test_off_by_default() -> None:
    cfg = variants.make_config("deepseek_moe")
    assert (cfg.alpha2, cfg.num_devices) == (0.0, 1)
    layer, x = with_logits("deepseek_moe", torch.randn(6, 6), top_k=2, num_devices=3)
    assert layer.train()(x).losses.keys() == {"balance"}


@pytest.mark.parametrize(("num_devices", "top_k"), [(3, 2), (2, 3), (6, 1), (1, 2)])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])  # counted before drops
def test_device_balance_matches_eq_15_to_17(
    num_devices: int, top_k: int, capacity_factor: float | None
) -> None:
    logits = torch.randn(10, 6) * 2
    layer, x = with_logits(
        "deepseek_moe",
        logits,
        top_k=top_k,
        num_devices=num_devices,
        alpha2=0.05,
        capacity_factor=capacity_factor,
    )
    out = layer.train()(x)
    expected = 0.05 * device_loss_by_hand(torch.softmax(logits, -1), top_k, num_devices)
    assert out.losses["device_balance"].item() == pytest.approx(expected, rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(
        out.losses["balance"].item() + out.losses["device_balance"].item()
    )


def test_device_balance_is_alpha2_under_perfect_balance() -> None:
    # tokens take experts {0,1}, {2,3}, {4,5} in turn: every f_i = 1, so the loss is
    # alpha2 * sum_d P'_d = alpha2 * sum_i P_i = alpha2
    logits = torch.zeros(6, 6)
    for t in range(6):
        logits[t, (2 * t) % 6] = 3.0
        logits[t, (2 * t + 1) % 6] = 2.0
    layer, x = with_logits("deepseek_moe", logits, top_k=2, num_devices=2, alpha2=0.05)
    assert layer.train()(x).losses["device_balance"].item() == pytest.approx(0.05)


def test_device_balance_grows_when_one_device_is_favoured() -> None:
    balanced = torch.zeros(4, 4)
    balanced[[0, 1], 0] = 3.0
    balanced[[2, 3], 2] = 3.0  # devices {0,1} and {2,3} share the tokens
    skewed = torch.zeros(4, 4)
    skewed[:, 0] = 3.0  # every token goes to device 0
    values = []
    for logits in (balanced, skewed):
        layer, x = with_logits("deepseek_moe", logits, top_k=1, num_devices=2, alpha2=1.0)
        values.append(layer.train()(x).losses["device_balance"].item())
    scores = [torch.softmax(t, -1) for t in (balanced, skewed)]
    assert values == pytest.approx([device_loss_by_hand(s, 1, 2) for s in scores], rel=1e-6)
    assert values[1] > values[0]


def test_eval_has_no_losses() -> None:
    layer, x = with_logits("deepseek_moe", torch.randn(6, 6), top_k=2, num_devices=3, alpha2=0.1)
    assert layer.eval()(x).losses == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_experts=6, top_k=2, num_devices=4), "num_experts=6 must be divisible"),
        (dict(num_experts=6, top_k=2, num_devices=0), "num_devices=0"),
        (dict(num_experts=6, top_k=2, alpha2=-1.0), "alpha2=-1.0"),
    ],
)
def test_invalid_fields_raise_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("deepseek_moe", d_model=8, expert_hidden=8, **fields)
