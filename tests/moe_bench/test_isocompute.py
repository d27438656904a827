"""Iso-compute sizes, parameter counts and FLOPs (moe_bench.isocompute)."""

from __future__ import annotations

import pytest
import torch

import variants
from moe_bench.isocompute import (
    count_params,
    dense_reference,
    ffn_flops_per_token,
    iso_fields,
)

MODEL = {"d_model": 32, "d_ff": 64, "expansion": 8, "active": 2}


@pytest.mark.parametrize(
    ("variant", "knobs", "sizes"),
    [
        # Switch: top-1, so its one expert is active * d_ff wide and there are half as many
        ("switch", {"top_k": 1}, {"expert_hidden": 128, "num_experts": 4, "top_k": 1}),
        ("gshard", {"top_k": 2}, {"expert_hidden": 64, "num_experts": 8, "top_k": 2}),
        # DeepSeekMoE: m=4, one shared: d_ff/4 wide, 4*8-1 routed, 4*2-1 active
        (
            "deepseek_moe",
            {"granularity": 4, "shared": 1},
            {"expert_hidden": 16, "num_experts": 31, "top_k": 7, "num_shared_experts": 1},
        ),
        ("noisy_topk", {"top_k": 4}, {"expert_hidden": 32, "num_experts": 16, "top_k": 4}),
        (
            "deepseek_v2",
            {"granularity": 4, "shared": 2},
            {"expert_hidden": 16, "num_experts": 30, "top_k": 6, "num_shared_experts": 2},
        ),
    ],
)
def test_iso_fields_table(variant: str, knobs: dict, sizes: dict) -> None:
    fields = iso_fields(variants.lookup(variant).config, **MODEL, **knobs)
    assert {k: fields[k] for k in sizes} == sizes
    shared = fields["num_shared_experts"]
    # equal active expert width and equal total expert width, in units of d_ff
    assert (fields["top_k"] + shared) * fields["expert_hidden"] == MODEL["active"] * MODEL["d_ff"]
    total = (fields["num_experts"] + shared) * fields["expert_hidden"]
    assert total == MODEL["expansion"] * MODEL["d_ff"]


def test_dense_gets_active_width() -> None:
    fields = iso_fields(variants.lookup("dense").config, **MODEL)
    assert fields["d_ff"] == 128 and fields["num_experts"] == fields["top_k"] == 1


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"granularity": 3}, r"expert_hidden = d_ff / m = 64 / \(3\)"),
        ({"top_k": 99}, r"granularity m=99/2"),
        ({"granularity": 0.25}, r"top_k = m \* K - Ks = \(1/4\) \* 2 - 0 = 0.5"),
        ({}, "granularity or variant.top_k must be set"),
    ],
)
def test_iso_fields_rejects_fractional_sizes(knobs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        iso_fields(variants.lookup("switch").config, **MODEL, **knobs)


def test_count_params_by_hand() -> None:
    E, D, H, K = 4, 8, 16, 2
    layer = variants.build("gshard", d_model=D, num_experts=E, expert_hidden=H, top_k=K)
    expert = 2 * D * H  # w1 and w2 of one expert
    total, active = count_params(layer)
    assert total == E * D + E * expert  # router centroids + experts
    assert active == E * D + K * expert


def test_count_params_shared_and_dense() -> None:
    layer = variants.build(
        "deepseek_moe", d_model=8, num_experts=6, expert_hidden=4, top_k=3, num_shared_experts=2
    )
    expert = 2 * 8 * 4
    assert count_params(layer) == (6 * 8 + 8 * expert, 6 * 8 + 5 * expert)
    dense = variants.build("dense", d_model=8, d_ff=20)
    assert count_params(dense) == (2 * 8 * 20, 2 * 8 * 20)


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "clamped_swiglu"])
def test_flops_match_dense_reference(activation: str) -> None:
    cfg = variants.make_config(
        "deepseek_moe", d_model=16, num_experts=15, expert_hidden=8, top_k=3,
        num_shared_experts=1, activation=activation,
    )  # fmt: skip
    dense = variants.make_config("dense", **dense_reference(cfg))
    router = 2 * 16 * 15
    assert dense.d_ff == 8 * (3 + 1) == 32  # expert_hidden x (top_k + shared)
    assert ffn_flops_per_token(cfg) - router == ffn_flops_per_token(dense)
    mats = 2 if activation == "gelu" else 3  # gated: w1, w3 and w2
    assert ffn_flops_per_token(dense) == 2 * mats * 16 * 32


def test_count_params_on_meta_device_allocates_nothing() -> None:
    with torch.device("meta"):
        layer = variants.build("deepseek_v3", d_model=4096, num_experts=256, expert_hidden=2048)
    total, active = count_params(layer)
    assert total > 4e9 and active < total / 10


def test_expert_biases_count_as_routed_parameters() -> None:
    """gpt-oss's expert biases are expert parameters: active in top_k/E of their count."""
    layer = variants.build("gpt_oss", d_model=8, num_experts=4, top_k=2, expert_hidden=4)
    router = 4 * 8 + 4  # weight and bias
    expert = 3 * 8 * 4 + 4 + 4 + 8  # w1, w3, w2 and b1, b3, b2
    assert count_params(layer) == (router + 4 * expert, router + 2 * expert)
