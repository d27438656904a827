"""Qwen2-MoE options on the DeepSeekMoE family (HF transformers `Qwen2MoeSparseMoeBlock`):
`shared_gate`, `shared_hidden`, `norm_topk_prob`."""

from __future__ import annotations

import pytest
import torch

import variants

FAMILY = {
    "deepseek_moe": dict(num_experts=8, top_k=2),
    "deepseek_v2": dict(num_experts=8, top_k=2, num_devices=4, max_devices=2),
    "deepseek_v3": dict(num_experts=8, top_k=2, num_groups=1, topk_groups=1),
}
SMALL = dict(d_model=16, expert_hidden=8, num_shared_experts=2)


def build(name: str, **fields) -> torch.nn.Module:
    return variants.build(name, **SMALL, **FAMILY[name], **fields)


@pytest.mark.parametrize("name", list(FAMILY))
def test_shared_hidden_sets_the_shared_width(name: str) -> None:
    layer = build(name, shared_hidden=24, activation="swiglu")
    assert layer.shared.w1.shape == (2, 16, 24) and layer.shared.w2.shape == (2, 24, 16)
    assert layer.experts.w1.shape == (8, 16, 8)


@pytest.mark.parametrize("name", list(FAMILY))
def test_shared_gate_scales_the_shared_output_by_a_sigmoid(name: str) -> None:
    plain = build(name).eval()
    gated = build(name, shared_gate=True).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    assert gated.shared_gate.weight.shape == (1, 16)
    x = torch.randn(5, 16)
    with torch.no_grad():
        shared = plain.shared.sum_all(x)
        routed = plain(x).y - shared
        gate = torch.sigmoid(x @ gated.shared_gate.weight.T)
        torch.testing.assert_close(gated(x).y, routed + gate * shared)
    assert plain.shared_gate is None


@pytest.mark.parametrize("name", ["deepseek_moe", "deepseek_v2"])
def test_norm_topk_prob_makes_weights_sum_to_one(name: str) -> None:
    x = torch.randn(6, 16)
    r = build(name, norm_topk_prob=True).eval()(x).routing
    sums = torch.zeros(6).index_add(0, r.token, r.weight)
    torch.testing.assert_close(sums, torch.ones(6))
    r = build(name).eval()(x).routing
    assert torch.zeros(6).index_add(0, r.token, r.weight).lt(1).all()  # paper: unnormalised


def test_v3_norm_topk_prob_off_gives_the_raw_sigmoid_scores() -> None:
    layer = build("deepseek_v3", norm_topk_prob=False).eval()
    r = layer(torch.randn(6, 16)).routing
    torch.testing.assert_close(r.weight, r.scores[r.token, r.expert])
    assert variants.make_config("deepseek_v3").norm_topk_prob is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shared_hidden": 0}, "shared_hidden=0 must be >= 1"),
        ({"shared_hidden": 2.5}, "shared_hidden=2.5 must be an integer"),
        ({"shared_gate": "no"}, "shared_gate='no' must be true or false"),
        ({"norm_topk_prob": 1}, "norm_topk_prob=1 must be true or false"),
        ({"shared_gate": True, "num_shared_experts": 0}, "shared_gate=True needs"),
        ({"shared_hidden": 8, "num_shared_experts": 0}, "shared_hidden=8 needs"),
    ],
)
@pytest.mark.parametrize("name", list(FAMILY))
def test_bad_fields(name: str, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build(name, **{**SMALL, **FAMILY[name], **fields})


def test_config_exposes_shared_width_and_ffn_experts_per_token() -> None:
    cfg = variants.make_config("deepseek_moe", shared_hidden=24)
    assert cfg.shared_width == 24 and cfg.ffn_experts_per_token() == cfg.top_k
    assert variants.make_config("deepseek_moe").shared_width == 256
    layer = variants.build("topp", d_model=8, expert_hidden=8, top_p=1.0)
    r = layer.eval()(torch.randn(3, 8)).routing
    assert layer.cfg.ffn_experts_per_token(r) == 16.0  # p = 1 keeps every expert
