"""moe_plus_plus against Jin et al. 2024 (arXiv:2410.07348, Sec. 3): zero, copy and constant
experts in one pool with the FFN experts, gating residuals, heterogeneous balance."""

from __future__ import annotations

import pytest
import torch

import variants
from variants.compute.assignments import experts_per_token_stats

# pool: FFN 0, FFN 1, zero (2), copy (3), constant (4)
LOGITS = torch.tensor(
    [
        [0.0, 0.0, 5.0, 4.0, 0.0],  # zero + copy: skips the FFNs
        [5.0, 0.0, 0.0, 0.0, 4.0],  # FFN 0 + constant
        [4.0, 5.0, 0.0, 0.0, 0.0],  # FFN 1 + FFN 0
    ]
)


def hand_layer(**fields) -> tuple[torch.nn.Module, torch.Tensor]:
    """Router weights set so that x = I_3 gives exactly LOGITS over the pool."""
    layer = variants.build(
        "moe_plus_plus",
        d_model=3,
        num_experts=2,
        expert_hidden=4,
        num_zero_experts=1,
        num_copy_experts=1,
        num_constant_experts=1,
        **fields,
    )
    with torch.no_grad():
        layer.router.weight.copy_(LOGITS[:, :2].T)
        layer.router.zc_weight.copy_(LOGITS[:, 2:].T)
    return layer, torch.eye(3)


def test_outputs_by_hand_raw_probabilities() -> None:
    layer, x = hand_layer(norm_topk_prob=False)
    out = layer.eval()(x)
    p = torch.softmax(LOGITS, -1)
    with torch.no_grad():
        a = torch.softmax(layer.const_gate[0] @ x[1], -1)
        const = a[0] * x[1] + a[1] * layer.const_vec[0]
        y0 = p[0, 3] * x[0]  # the zero expert adds nothing, the copy expert adds x
        y1 = p[1, 0] * layer.experts.expert_ffn(0, x[1:2])[0] + p[1, 4] * const
        y2 = (
            p[2, 1] * layer.experts.expert_ffn(1, x[2:3])[0]
            + p[2, 0] * layer.experts.expert_ffn(0, x[2:3])[0]
        )
    torch.testing.assert_close(out.y, torch.stack([y0, y1, y2]))


def test_default_weights_drop_the_zero_gate_and_renormalise() -> None:
    """The authors' gating: a token on (zero, copy) passes x through with weight 1."""
    layer, x = hand_layer()
    out = layer.eval()(x)
    p = torch.softmax(LOGITS, -1)
    r = out.routing
    got = {(t, e): w for t, e, w in zip(r.token.tolist(), r.expert.tolist(), r.weight.tolist())}
    assert got[(1, 0)] == pytest.approx(float(p[1, 0] / (p[1, 0] + p[1, 4])), rel=1e-6)
    assert got[(2, 1)] == pytest.approx(float(p[2, 1] / (p[2, 1] + p[2, 0])), rel=1e-6)
    torch.testing.assert_close(out.y[0], x[0])


def test_routing_holds_ffn_work_only() -> None:
    layer, x = hand_layer()
    out = layer.eval()(x)
    r = out.routing
    assert r.num_experts == 2 and r.expert.max() < 2
    assert experts_per_token_stats(r) == {"mean": 1.0, "min": 0.0, "max": 2.0}
    assert out.extras["pool_load"].tolist() == [2, 1, 1, 1, 1]
    torch.testing.assert_close(out.extras["gate_logits"], LOGITS)


def test_gating_residual_adds_the_previous_layers_logits() -> None:
    layer, x = hand_layer()
    with torch.no_grad():
        layer.router.residual.copy_(torch.eye(5) * 2)
    prev = torch.zeros(3, 5)
    prev[0, 0] = 10.0  # token 0 now prefers FFN 0
    out = layer.eval()(x, gate_residual=prev)
    expected = LOGITS.clone()
    expected[0, 0] += 20.0
    torch.testing.assert_close(out.extras["gate_logits"], expected)
    assert 0 in out.routing.expert[out.routing.token == 0].tolist()
    # the gradient: G[t, i] += sum_j prev[t, j] W_g[i, j], so dL/dW_g[i, j] =
    # sum_t dL/dG[t, i] prev[t, j]. With prev 3 at [2, 3] alone (token 2 keeps FFN 1 + FFN 0,
    # whose renormalised weights depend on G[2, :2]), only column 3 is nonzero: 3 * dL/dG[2]
    prev = torch.zeros(3, 5)
    prev[2, 3] = 3.0
    out = layer.eval()(x, gate_residual=prev)
    gate_logits = out.extras["gate_logits"]
    gate_logits.retain_grad()
    out.y.sum().backward()
    grad = layer.router.residual.grad
    assert gate_logits.grad[2].abs().sum() > 0
    torch.testing.assert_close(grad[:, 3], 3.0 * gate_logits.grad[2])
    assert not grad[:, [0, 1, 2, 4]].any()


def test_no_residual_parameter_when_disabled() -> None:
    layer, x = hand_layer(gating_residual=False)
    assert layer.router.residual is None
    layer(x, gate_residual=torch.ones(3, 5))  # ignored


def test_heterogeneous_balance_by_hand() -> None:
    layer, x = hand_layer()
    loss = layer.train()(x).losses["balance"]
    p = torch.softmax(LOGITS, -1)
    # Eq. 7: f_i = tokens selecting i / T (3 tokens, top-2: f sums to 2), no pool-size factor
    f = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0]) / 3
    eta = torch.tensor([1.0, 1.0, 0.75, 0.75, 0.75])
    expected = 0.01 * float((eta * f * p.mean(0)).sum())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pool_defaults_are_the_papers() -> None:
    cfg = variants.make_config("moe_plus_plus")
    assert (cfg.num_experts, cfg.num_zero_experts, cfg.num_copy_experts) == (8, 1, 1)
    assert (cfg.num_constant_experts, cfg.top_k, cfg.tau) == (2, 2, 0.75)
    assert cfg.pool_size == 12 and cfg.variable_k


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_zero_experts": -1}, "num_zero_experts=-1 must be >= 0"),
        ({"num_copy_experts": 1.5}, "num_copy_experts=1.5 must be an integer"),
        ({"num_constant_experts": -2}, "num_constant_experts=-2 must be >= 0"),
        ({"tau": 0}, "tau=0 must be > 0"),
        ({"balance_coef": -1}, "balance_coef=-1 must be >= 0"),
        ({"gating_residual": "yes"}, "gating_residual='yes' must be true or false"),
        ({"norm_topk_prob": 0}, "norm_topk_prob=0 must be true or false"),
        ({"capacity_factor": 1.0}, "capacity_factor=1.0 must be None"),
        ({"backend": "megablocks"}, "zero-computation experts take some"),
    ],
)
def test_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("moe_plus_plus", **fields)
