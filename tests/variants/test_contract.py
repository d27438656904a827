"""The `variants` contract of docs/contract.md §2: registry, shapes, records, modes, errors."""

from __future__ import annotations

import pytest
import torch

import variants

from .helpers import feed_token_ids

HEADLINE = ["dense", "switch", "gshard", "deepseek_moe", "deepseek_v3"]
ALL = variants.names()
ROUTED = [n for n in ALL if n != "dense"]
SMALL = dict(d_model=16, num_experts=8, expert_hidden=8, top_k=2)


def small(name: str, **extra) -> torch.nn.Module:
    fields = dict(SMALL, **extra)
    if name == "switch":
        fields["top_k"] = 1
    if name == "deepseek_v3":
        fields.update(num_groups=4, topk_groups=2)
    if name == "longcat_flash":
        fields.setdefault("num_identity_experts", 4)
    return feed_token_ids(variants.build(name, **fields))


def test_names_are_sorted_and_hold_the_headline_variants() -> None:
    names = variants.names()
    assert names == sorted(names)
    assert set(HEADLINE) <= set(names)
    assert len(names) == 23


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (2, 3, 4, 16)])
def test_output_record_shapes(name: str, shape: tuple[int, ...]) -> None:
    layer = small(name).train()
    x = torch.randn(shape, requires_grad=True)
    out = layer(x)
    T = x[..., 0].numel()
    assert out.y.shape == x.shape
    assert out.aux_loss.dim() == 0
    if out.losses:
        torch.testing.assert_close(out.aux_loss, sum(out.losses.values()))
        assert out.aux_loss.requires_grad
        assert set(out.losses) <= {
            "balance",
            "device_balance",
            "comm_balance",
            "z",
            "importance",
            "load",
        }
    r = out.routing
    assert isinstance(r, variants.Routing) and r.num_tokens == T
    A = r.token.numel()
    assert r.expert.shape == r.weight.shape == (A,)
    assert r.token.dtype == r.expert.dtype == torch.long
    assert r.scores.shape == r.logits.shape == (T, r.num_experts)
    assert torch.equal(r.load, torch.bincount(r.expert, minlength=r.num_experts))
    assert (r.demand >= r.load).all()


@pytest.mark.parametrize("name", ALL)
def test_eval_mode_has_no_losses_and_is_deterministic(name: str) -> None:
    layer = small(name).eval()
    x = torch.randn(2, 6, 16)
    a, b = layer(x), layer(x)
    assert a.losses == {} and a.aux_loss.item() == 0.0
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)
    assert torch.equal(a.routing.expert, b.routing.expert)


@pytest.mark.parametrize("name", ROUTED)
def test_parameter_names_and_shapes(name: str) -> None:
    layer = small(name, activation="swiglu")
    E, D, H = layer.cfg.num_experts, 16, 8
    # X-MoE's expert embeddings live in its low-dim routing space (variants/xmoe.py)
    R = layer.cfg.routing_dim if name == "xmoe" else D
    assert layer.router.weight.shape == (E, R)
    assert layer.experts.w1.shape == (E, D, H)
    assert layer.experts.w2.shape == (E, H, D)
    assert layer.experts.w3.shape == (E, D, H)
    biased = {"deepseek_v3", "deepseek_v4", "longcat_flash"}  # a selection bias
    assert hasattr(layer.router, "expert_bias") == (name in biased)
    assert (layer.shared is None) == (layer.cfg.num_shared_experts == 0)


@pytest.mark.parametrize("name", ALL)
def test_update_bias_changes_only_what_a_router_updates(name: str) -> None:
    """`update_bias()` exists everywhere; no parameter moves, and a buffer moves only where the
    router updates one from its training load (V3's bias, ReMoE's L1 coefficient)."""
    layer = small(name).train()
    torch.manual_seed(0)
    layer(torch.randn(32, 16))
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    layer.update_bias()
    for n, p in layer.named_parameters():
        assert torch.equal(p, params[n]), f"update_bias moved parameter {n}"
    moved = {n for n, b in layer.named_buffers() if not torch.equal(b, buffers[n])}
    updated = {
        "deepseek_v3": {"router.expert_bias"},
        "deepseek_v4": {"router.expert_bias"},
        "longcat_flash": {"router.expert_bias"},
        "remoe": {"router.l1_coef"},
    }
    assert moved >= updated.get(name, set())
    # what was counted since the last update starts afresh (V3's load, ReMoE's counts)
    assert moved <= updated.get(name, set()) | {
        "router.load_count",
        "router.active_count",
        "router.slot_count",
    }
    for n, b in layer.named_buffers():
        if n in ("router.load_count", "router.active_count", "router.slot_count"):
            assert not b.any(), f"{n} not reset"


@pytest.mark.parametrize("name", ROUTED)
def test_force_uniform_routing_balances_load_exactly(name: str) -> None:
    dropless = {} if name == "expert_choice" else {"capacity_factor": None}  # EC: C is its rule
    layer = small(name, force_uniform_routing=True, **dropless)
    r = layer.train()(torch.randn(32, 16)).routing
    K = layer.cfg.top_k
    assert r.load.tolist() == [32 * K // 8] * 8
    assert r.weight.eq(1.0 / K).all()


def test_router_math_stays_float32_for_bf16_inputs() -> None:
    layer = small("switch").to(torch.bfloat16)
    out = layer(torch.randn(6, 16, dtype=torch.bfloat16))
    assert out.y.dtype == torch.bfloat16
    assert out.routing.scores.dtype == out.routing.logits.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("nope", {}, "variant='nope' is not one of"),
        ("switch", {"top_k": 2}, "top_k=2 must be 1 for switch"),
        ("gshard", {"num_experts": 1}, "top_k=2 must be <= num_experts=1"),
        ("deepseek_moe", {"num_experts": 8, "top_k": 9}, "top_k=9 must be <= num_experts=8"),
        ("deepseek_moe", {"num_experts": 0, "top_k": 1}, "num_experts=0 must be >= 1"),
        ("switch", {"capacity_factor": 0}, "capacity_factor=0 must be > 0"),
        ("switch", {"capacity_factor": -1.5}, "capacity_factor=-1.5 must be > 0"),
        ("switch", {"backend": "cuda_magic"}, "backend='cuda_magic' is not one of"),
        ("deepseek_moe", {"backend": "padded"}, "backend='padded' needs capacity buffers"),
        ("switch", {"activation": "relu"}, "activation='relu' is not one of"),
        ("switch", {"num_expert": 4}, "num_expert=4 is not a field of variant 'switch'"),
        ("switch", {"d_model": 2.5}, "d_model=2.5 must be an integer"),
        ("switch", {"router_dtype": "int8"}, "router_dtype='int8' is not one of"),
        ("deepseek_v3", {"num_experts": 10}, "num_experts=10 must be divisible by num_groups=8"),
        ("deepseek_v3", {"capacity_factor": 1.0}, "capacity_factor=1.0 must be None"),
        ("deepseek_v3", {"topk_groups": 9}, "topk_groups=9 must be <= num_groups=8"),
        ("deepseek_v3", {"top_k": 6}, "top_k=6 must be divisible by topk_groups=4"),
        ("dense", {"d_ff": 0}, "d_ff=0 must be >= 1"),
    ],
)
def test_bad_fields_raise_value_error_naming_field_value_and_rule(
    name: str, fields: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        variants.build(name, **fields)


@pytest.mark.parametrize("name", ALL)
def test_wrong_width_at_forward_is_a_value_error(name: str) -> None:
    layer = small(name)
    with pytest.raises(ValueError, match=r"last dim must equal d_model=16"):
        layer(torch.randn(3, 15))


def test_router_stays_float32_under_autocast() -> None:
    layer = small("switch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(6, 16))
    assert out.routing.logits.dtype == out.routing.scores.dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (0, 3, 16)])
def test_empty_input_is_a_value_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"holds 0 tokens"):
        small("deepseek_v3").train()(torch.randn(shape))


@pytest.mark.parametrize("fields", [{"top_k": "2"}, {"top_k": None}, {"num_shared_experts": None}])
def test_dense_bad_sizes_are_value_errors(fields: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        variants.build("dense", **fields)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_input_dtype_must_match_the_parameters(name: str, dtype: torch.dtype) -> None:
    layer = small(name)
    with pytest.raises(ValueError, match=rf"input dtype={dtype} must match the layer's param"):
        layer(torch.randn(4, 16, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast reconciles them
        assert layer(torch.randn(4, 16, dtype=torch.bfloat16)).y.shape == (4, 16)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ALL)
def test_a_non_finite_token_stays_in_its_row(name: str, mode: str) -> None:
    """NaN in one input element: no exception. That token's output is NaN (or zero where its
    router's selection is a comparison NaN fails, as ReMoE's ReLU gate > 0); the other tokens'
    outputs stay finite where no token's choice depends on another's (token choice without
    capacity); training losses that average over tokens become NaN."""
    layer = getattr(small(name), mode)()
    x = torch.randn(2, 6, 16)
    x[0, 1, 3] = float("nan")
    y = layer(x).y
    assert y[0, 1].isnan().any() or not y[0, 1].any()
    others_BS = y.isfinite().all(-1)
    others_BS[0, 1] = True
    if layer.cfg.capacity_factor is None and not layer.cfg.leaks_future_tokens:
        assert others_BS.all()


@pytest.mark.parametrize("name", ALL)
def test_every_variant_says_how_it_normalises_its_losses(name: str) -> None:
    note = variants.lookup(name).config.note
    assert isinstance(note, str) and note.strip()
    assert variants.MoEConfig.note == ""
