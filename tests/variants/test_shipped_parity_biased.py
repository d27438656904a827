"""Peer parity: our layers against the released models' bias-corrected MoE blocks in HF transformers
(GLM-4.5, dots.llm1, MiniMax-M2, ERNIE-4.5, LongCat-Flash, DeepSeek-V4); the softmax-top-K and
own-rule blocks are in test_shipped_parity.py.

Checked with transformers 5.25.0 (`CHECKED_WITH`). For each model the HF block is built from
its config class at tiny sizes; weights are copied both ways (ours -> HF, then fresh HF weights
-> ours), and in eval mode, fp32, both give the same experts per token and `y` within 1e-5,
with the same gradients of a fixed projection of `y` (input, router, experts, shared experts):
every block here is differentiable the same way as ours (selection without gradient, weights
through the gathered scores). Skipped, with the reason, without transformers.

Shape legend: T tokens, D model width, E routed experts, H expert width, P pool (E + Z).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch

import variants

if importlib.util.find_spec("transformers") is None:  # found, not imported: a second per worker
    pytest.skip("peer parity needs HF transformers", allow_module_level=True)
CHECKED_WITH = "5.25.0"  # the transformers version these blocks were read and checked in

D, H, E, K = 16, 8, 8, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def hf(module: str, *names: str):
    mod = pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
    cfg = pytest.importorskip(f"transformers.models.{module}.configuration_{module}")
    return (getattr(cfg, names[0]), *(getattr(mod, n) for n in names[1:]))


# --- weight maps: (our tensor, HF tensor, how HF's reads as ours) -------------------------


def expert_pairs(ours, hf_experts) -> list[tuple[torch.Tensor, torch.Tensor, Callable]]:
    """HF packs gate and up as gate_up_proj [E, 2H, D], down_proj [E, D, H]; ours are
    w1 (gate) [E, D, H], w3 (up) [E, D, H], w2 [E, H, D]."""
    h = ours.hidden
    return [
        (ours.w1, hf_experts.gate_up_proj, lambda t: t[:, :h].transpose(1, 2)),
        (ours.w3, hf_experts.gate_up_proj, lambda t: t[:, h:].transpose(1, 2)),
        (ours.w2, hf_experts.down_proj, lambda t: t.transpose(1, 2)),
    ]


def shared_pairs(ours, mlp) -> list[tuple[torch.Tensor, torch.Tensor, Callable]]:
    """HF's one shared MLP of width n*H is our n shared experts of width H side by side."""
    n, h = ours.num_experts, ours.hidden
    return [
        (ours.w1, mlp.gate_proj.weight, lambda t: t.T.reshape(-1, n, h).transpose(0, 1)),
        (ours.w3, mlp.up_proj.weight, lambda t: t.T.reshape(-1, n, h).transpose(0, 1)),
        (ours.w2, mlp.down_proj.weight, lambda t: t.T.reshape(n, h, -1)),
    ]


def to_ours(pairs) -> None:
    with torch.no_grad():
        for mine, theirs, read in pairs:
            mine.copy_(read(theirs))


def to_hf(pairs) -> None:
    """Inverse of `to_ours`: every map is a view of HF's tensor (a slice, transpose or split),
    so writing ours into `read(theirs)` writes HF's tensor."""
    with torch.no_grad():
        for mine, theirs, read in pairs:
            view = read(theirs)
            assert view.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr()
            view.copy_(mine)


def randomise(*tensors: torch.Tensor, std: float = 0.3) -> None:
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t) * std)


def check_both_ways(ours, block, pairs, run_ours, run_hf, hf_params, on_x=None) -> None:
    """ours -> HF, compare; fresh HF weights -> ours, compare."""
    to_hf(pairs)
    compare(ours, block, pairs, run_ours, run_hf, on_x)
    randomise(*hf_params)
    to_ours(pairs)
    compare(ours, block, pairs, run_ours, run_hf, on_x)


def compare(ours, block, pairs, run_ours, run_hf, on_x=None) -> None:
    ours.eval(), block.eval()
    x = torch.randn(2, 5, D)
    if on_x is not None:
        on_x(x)
    g = torch.randn(2, 5, D)
    xo, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, chosen_ours = run_ours(xo)
    y_hf, chosen_hf = run_hf(xh)
    assert chosen_ours == chosen_hf
    torch.testing.assert_close(y_ours, y_hf, **TOL)
    ours.zero_grad(), block.zero_grad()
    (y_ours * g).sum().backward()
    (y_hf * g).sum().backward()
    torch.testing.assert_close(xo.grad, xh.grad, **TOL)
    for mine, theirs, read in pairs:
        if not mine.requires_grad:  # the selection biases: buffers on both sides
            assert theirs.grad is None
            continue
        torch.testing.assert_close(mine.grad, read(theirs.grad), **TOL)


def per_token(token_A: torch.Tensor, expert_A: torch.Tensor, T: int) -> list[list[int]]:
    return [sorted(expert_A[token_A == t].tolist()) for t in range(T)]


def our_run(layer, **kw):
    def run(x):
        out = layer(x, **kw)
        return out.y, per_token(out.routing.token, out.routing.expert, x[..., 0].numel())

    return run


def hf_run(block, gate, **kw):
    def run(x):
        idx = gate_indices(gate, x, **kw)
        return block(x, **kw), [sorted(row) for row in idx.tolist()]

    return run


def gate_indices(gate, x, **kw) -> torch.Tensor:
    """The HF router's [T, K] choices; its blocks call it on the flattened [T, D] tokens."""
    x_TD = x.reshape(-1, D)
    return (gate(x_TD, kw["input_ids"]) if "input_ids" in kw else gate(x_TD))[-1]


# --- DeepSeek-V3-style routers: GLM-4.5, dots.llm1, MiniMax-M2, ERNIE-4.5 -----------------


def v3_layer(**fields):
    base = dict(d_model=D, num_experts=E, expert_hidden=H, top_k=K, activation="swiglu")
    return variants.build("deepseek_v3", **{**base, **fields})


@pytest.mark.parametrize(
    ("module", "names", "extra", "ours"),
    [
        (
            "glm4_moe",
            ("Glm4MoeConfig", "Glm4MoeMoE"),
            dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
            dict(num_groups=2, topk_groups=1, routed_scaling_factor=2.5, norm_topk_prob=True),
        ),
        (
            "dots1",
            ("Dots1Config", "Dots1MoE"),
            dict(n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=False),
            dict(num_groups=1, topk_groups=1, routed_scaling_factor=2.5, norm_topk_prob=False),
        ),
    ],
)
def test_glm4_moe_and_dots1_match_hf(module, names, extra, ours) -> None:
    Config, Block = hf(module, *names)
    cfg = Config(
        hidden_size=D, moe_intermediate_size=H, n_routed_experts=E, num_experts_per_tok=K,
        n_shared_experts=2, **extra,
    )  # fmt: skip
    block = Block(cfg)
    layer = v3_layer(num_shared_experts=2, **ours)
    randomise(block.gate.e_score_correction_bias, std=0.2)
    pairs = [
        (layer.router.weight, block.gate.weight, lambda t: t),
        (layer.router.expert_bias, block.gate.e_score_correction_bias, lambda t: t),
        *expert_pairs(layer.experts, block.experts),
        *shared_pairs(layer.shared, block.shared_experts),
    ]
    check_both_ways(
        layer,
        block,
        pairs,
        our_run(layer),
        hf_run(block, block.gate),
        [p for p in block.parameters()],
    )


def test_minimax_m2_matches_hf() -> None:
    Config, Block = hf("minimax_m2", "MiniMaxM2Config", "MiniMaxM2SparseMoeBlock")
    cfg = Config(hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=K)
    block = Block(cfg)
    layer = v3_layer(num_groups=1, topk_groups=1, num_shared_experts=0)
    randomise(block.e_score_correction_bias, std=0.2)
    pairs = [
        (layer.router.weight, block.gate.weight, lambda t: t),
        (layer.router.expert_bias, block.e_score_correction_bias, lambda t: t),
        *expert_pairs(layer.experts, block.experts),
    ]

    def gate(x):
        return block.gate(x, block.e_score_correction_bias)

    check_both_ways(
        layer, block, pairs, our_run(layer), hf_run(block, gate), list(block.parameters())
    )


def test_ernie4_5_moe_matches_hf() -> None:
    Config, Block = hf("ernie4_5_moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeSparseMoeBlock")
    cfg = Config(
        hidden_size=D, moe_intermediate_size=H, moe_num_experts=E, moe_k=K,
        moe_num_shared_experts=2,
    )  # fmt: skip
    block = Block(cfg)
    layer = v3_layer(num_groups=1, topk_groups=1, score="softmax", num_shared_experts=2)
    statics = block.gate.moe_statics.e_score_correction_bias  # [1, E], requires_grad False
    randomise(statics, std=0.05)
    pairs = [
        (layer.router.weight, block.gate.weight, lambda t: t),
        (layer.router.expert_bias, statics, lambda t: t[0]),
        *expert_pairs(layer.experts, block.experts),
        *shared_pairs(layer.shared, block.shared_experts),
    ]
    hf_params = [p for p in block.parameters() if p.requires_grad] + [statics]
    check_both_ways(layer, block, pairs, our_run(layer), hf_run(block, block.gate), hf_params)


# --- LongCat-Flash: identity experts in the pool -------------------------------------------


def test_longcat_flash_matches_hf() -> None:
    Config, Block = hf("longcat_flash", "LongcatFlashConfig", "LongcatFlashMoE")
    Z, K3 = 4, 3
    cfg = Config(
        hidden_size=D, expert_ffn_hidden_size=H, n_routed_experts=E, zero_expert_num=Z,
        moe_topk=K3, routed_scaling_factor=6.0,
    )  # fmt: skip
    block = Block(cfg)
    layer = variants.build(
        "longcat_flash", d_model=D, num_experts=E, num_identity_experts=Z, top_k=K3,
        expert_hidden=H, activation="swiglu", routed_scaling_factor=6.0,
    )  # fmt: skip
    randomise(block.router.e_score_correction_bias, std=0.1)
    classifier = block.router.classifier.weight  # [P, D]: FFN experts, then identity experts
    pairs = [
        (layer.router.weight, classifier, lambda t: t[:E]),
        (layer.router.zc_weight, classifier, lambda t: t[E:]),
        (layer.router.expert_bias, block.router.e_score_correction_bias, lambda t: t),
        *expert_pairs(layer.experts, block.experts),
    ]
    seen_identity = []

    def run_ours(x):
        y = layer(x).y
        x_TD = x.reshape(-1, D)
        expert_A = layer.route(x_TD, layer.router.pool_logits(x_TD, None))[2]
        seen_identity.append(bool((expert_A >= E).any()))
        return y, [sorted(row) for row in expert_A.view(-1, K3).tolist()]

    check_both_ways(
        layer,
        block,
        pairs,
        run_ours,
        hf_run(block, block.router),
        [*block.parameters(), block.router.e_score_correction_bias],
    )
    assert all(seen_identity)  # the identity experts were chosen, so their path is checked


# --- DeepSeek-V4: V3-style router with sqrt(softplus), hash routing in the first layers -----


def v4_hf(layer_type: str):
    Config, Block = hf("deepseek_v4", "DeepseekV4Config", "DeepseekV4SparseMoeBlock")
    cfg = Config(
        hidden_size=D, moe_intermediate_size=H, n_routed_experts=E, num_experts_per_tok=K,
        n_shared_experts=1, vocab_size=V4_VOCAB, num_hidden_layers=2,
        mlp_layer_types=[layer_type, layer_type],
    )  # fmt: skip
    return cfg, Block(cfg, layer_idx=0)


V4_VOCAB = 32


def v4_pairs(layer, block) -> list:
    return [
        (layer.router.weight, block.gate.weight, lambda t: t),
        *expert_pairs(layer.experts, block.experts),
        *shared_pairs(layer.shared, block.shared_experts),
    ]


def inside_swiglu_limit(block, limit: float):
    """The HF experts clamp gate and up at `swiglu_limit`; ours do not: check no input of the
    test reaches it, so the comparison is of the routing, not of the clamp."""

    def check(x):
        pre = torch.einsum("td,ehd->teh", x.reshape(-1, D), block.experts.gate_up_proj)
        assert pre.abs().max() < limit

    return check


def test_deepseek_v4_learned_layer_matches_hf() -> None:
    cfg, block = v4_hf("moe")
    layer = variants.build(
        "deepseek_v4", d_model=D, num_experts=E, top_k=K, expert_hidden=H,
        activation="swiglu", vocab_size=V4_VOCAB,
    )  # fmt: skip
    assert layer.cfg.routed_scaling_factor == cfg.routed_scaling_factor == 1.5
    randomise(block.gate.e_score_correction_bias, std=0.2)
    pairs = [
        *v4_pairs(layer, block),
        (layer.router.expert_bias, block.gate.e_score_correction_bias, lambda t: t),
    ]
    check_both_ways(
        layer,
        block,
        pairs,
        our_run(layer),
        hf_run(block, block.gate),
        list(block.parameters()),
        inside_swiglu_limit(block, cfg.swiglu_limit),
    )


def test_deepseek_v4_hash_layer_matches_hf() -> None:
    """The first MoE layer of the deepseek_v4 variant is its hash layer (`at_depth(0)`)."""
    cfg, block = v4_hf("hash_moe")
    v4 = variants.make_config(
        "deepseek_v4", d_model=D, num_experts=E, top_k=K, expert_hidden=H,
        activation="swiglu", vocab_size=V4_VOCAB,
    )  # fmt: skip
    layer = variants.build_config(v4.at_depth(0))
    assert layer.cfg.uses_token_ids and not v4.at_depth(v4.hash_layers).uses_token_ids
    ids = torch.randint(0, V4_VOCAB, (2, 5))
    pairs = [*v4_pairs(layer, block), (layer.router.tid2eid, block.gate.tid2eid, lambda t: t)]
    run_ours, run_hf = our_run(layer, token_ids=ids), hf_run(block, block.gate, input_ids=ids)
    limit = inside_swiglu_limit(block, cfg.swiglu_limit)
    to_hf(pairs)
    compare(layer, block, pairs, run_ours, run_hf, limit)
    # fresh HF weights and a fresh id table (another seed's) -> ours
    randomise(*block.parameters())
    with torch.no_grad():
        block.gate.tid2eid.copy_(torch.rand(V4_VOCAB, E).argsort(-1)[:, :K])
    to_ours(pairs)
    compare(layer, block, pairs, run_ours, run_hf, limit)
