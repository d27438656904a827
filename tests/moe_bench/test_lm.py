"""TinyLM: shapes with every kind of FFN, causality, learning, bias updates, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import variants
from moe_bench.lm import LMConfig, LMOutput, TinyLM, build_lm
from tests.slow_cases import some_slow

D = 32  # multiple of 8, so the grouped backend fits
TINY = {
    "dense": dict(d_ff=64),
    "switch": dict(num_experts=4, expert_hidden=32),
    "gshard": dict(num_experts=4, expert_hidden=16),
    "deepseek_moe": dict(num_experts=6, top_k=2, expert_hidden=16, num_shared_experts=1),
    "deepseek_v3": dict(
        num_experts=8, top_k=2, expert_hidden=16, num_shared_experts=1, num_groups=2, topk_groups=1
    ),
    "hash": dict(num_experts=4, expert_hidden=32),  # top-1 by a fixed id table
    "deepseek_v4": dict(num_experts=8, top_k=2, expert_hidden=16, hash_layers=1),
}


def tiny_lm(variant: str, backend: str = "loop", **model: int) -> TinyLM:
    cfg = LMConfig(**{"d_model": D, "n_layers": 2, "n_heads": 4, "seq_len": 32, **model})
    return build_lm(variant, {**TINY[variant], "backend": backend}, cfg)


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize("variant", list(TINY))
@pytest.mark.parametrize(("n_layers", "moe_every", "moe_layers"), [(2, 1, [0, 1]), (4, 2, [1, 3])])
def test_shapes_and_layer_records(variant, backend, n_layers, moe_every, moe_layers):
    lm = tiny_lm(variant, backend, n_layers=n_layers, moe_every=moe_every)
    idx_BS = random_tokens(3, 20)
    out = lm(idx_BS, targets_BS=random_tokens(3, 20, seed=1))
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (3, 20, 256)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
    assert [rec.layer for rec in out.layers] == moe_layers == lm.cfg.moe_layers()
    for rec in out.layers:
        assert rec.routing.num_tokens == 3 * 20
        assert rec.routing.scores.shape[0] == 3 * 20
    expected_aux = sum(sum(rec.losses.values(), torch.zeros(())) for rec in out.layers)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    assert lm(idx_BS).loss is None


def test_loss_is_next_token_cross_entropy():
    lm = tiny_lm("switch")
    idx_BS, targets_BS = random_tokens(2, 16), random_tokens(2, 16, seed=1)
    out = lm(idx_BS, targets_BS)
    expected = F.cross_entropy(out.logits.reshape(-1, 256), targets_BS.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_dense_blocks_have_the_active_width_of_the_variant():
    lm = tiny_lm("deepseek_v3", n_layers=4, moe_every=2)
    fields = TINY["deepseek_v3"]
    active = fields["expert_hidden"] * (fields["top_k"] + fields["num_shared_experts"])
    for i, block in enumerate(lm.blocks):
        assert isinstance(block.ffn, variants.MoELayer) == (i in (1, 3))
        if i in (0, 2):
            assert block.ffn.cfg.d_ff == active
            assert block.ffn.cfg.activation == "gelu"


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize("variant", ["dense", "switch", "deepseek_v3"])
def test_trains_under_bf16_autocast(variant, backend):
    """The GPU recipe (bf16 autocast), run on CPU: fp32 loss, gradients reach every weight."""
    lm = tiny_lm(variant, backend).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(random_tokens(2, 16), random_tokens(2, 16, seed=1))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in lm.parameters())


# Causal variants only: capacity dropping in token order (switch) looks only backwards within a
# sequence, but the flattened batch puts sequence b after sequences 0..b-1, so with B > 1 a
# sequence's drops can depend on earlier sequences. B = 1 isolates causality proper. gshard is
# left out: its first choices of *all* tokens fill capacity before any second choice, so a later
# token can evict an earlier token's second choice.
# expert_choice with selection_scope=position picks among the B sequences' tokens at one
# position (B = 4, so the choice is a real one), so later positions never count.
# (variant, layer fields, B)
CAUSAL = [
    ("dense", {}, 1),
    ("switch", {}, 1),
    ("deepseek_moe", {}, 1),
    ("deepseek_v3", {}, 1),
    ("expert_choice", {"num_experts": 4, "expert_hidden": 16, "selection_scope": "position"}, 4),
]


@pytest.mark.parametrize(("variant", "fields", "B"), CAUSAL, ids=[v for v, _, _ in CAUSAL])
def test_future_tokens_do_not_change_earlier_logits(variant: str, fields: dict, B: int) -> None:
    cfg = LMConfig(d_model=D, n_layers=2, n_heads=4, seq_len=32)
    lm = build_lm(variant, {**TINY.get(variant, {}), "backend": "loop", **fields}, cfg).eval()
    idx_BS = random_tokens(B, 24)
    changed_BS = idx_BS.clone()
    changed_BS[:, 12:] = random_tokens(B, 12, seed=5)
    with torch.no_grad():
        before, after = lm(idx_BS).logits, lm(changed_BS).logits
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.skipif("expert_choice" not in variants.names(), reason="expert_choice not registered")
def test_expert_choice_leaks_future_tokens():
    cfg = LMConfig(d_model=D, n_layers=2, n_heads=4, seq_len=32)
    lm = build_lm("expert_choice", dict(num_experts=4, expert_hidden=16), cfg).eval()
    idx_BS = random_tokens(2, 32)
    changed_BS = idx_BS.clone()
    changed_BS[:, 16:] = random_tokens(2, 16, seed=5)
    with torch.no_grad():
        before, after = lm(idx_BS).logits, lm(changed_BS).logits
    # each expert picks its top tokens over the whole batch, future positions included
    assert not torch.allclose(before[:, :16], after[:, :16], rtol=0, atol=1e-6)


def train(lm: TinyLM, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> list[float]:
    """AdamW on `loss + aux_loss`, update_bias after every step; returns the LM losses."""
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    losses = []
    for idx_BS, targets_BS in batches:
        out = lm(idx_BS, targets_BS)
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
        lm.update_bias()
        losses.append(out.loss.item())
    return losses


CYCLE = b"abcdefghijklmnopqrstuvwx"  # each byte fixes the next: learnable in a few steps


def cycle_batches(steps: int, batch: int, length: int) -> list[tuple[torch.Tensor, ...]]:
    """Random windows of CYCLE repeated."""
    text_N = torch.tensor(list(CYCLE * 20))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        start_B = torch.randint(len(text_N) - length - 1, (batch,), generator=g)
        window_BS = text_N[start_B[:, None] + torch.arange(length + 1)]
        batches.append((window_BS[:, :-1], window_BS[:, 1:]))
    return batches


# a dense FFN and a routed layer with its bias state learn in the default run; the rest in the
# slow run
@pytest.mark.parametrize(
    "variant",
    some_slow(
        ["dense", "switch", "deepseek_v3", "hash", "deepseek_v4"],
        ["switch", "hash", "deepseek_v4"],
    ),
)
def test_loss_falls_well_below_unigram_entropy(variant):
    lm = tiny_lm(variant).train()
    losses = train(lm, cycle_batches(30, 8, 32), lr=1e-2)
    assert losses[0] > 4.5  # about ln 256 = 5.55 at init
    # ln 24 nats: the best a model blind to the current byte can do on CYCLE
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(len(CYCLE))


def test_update_bias_follows_the_training_load():
    lm = tiny_lm("deepseek_v3").train()
    rate = lm.blocks[0].ffn.cfg.bias_update_rate
    idx_BS, targets_BS = cycle_batches(1, 4, 32)[0]
    out = lm(idx_BS, targets_BS)
    (out.loss + out.aux_loss).backward()
    lm.update_bias()
    for rec in out.layers:
        load_E = rec.routing.load.float()
        expected_E = rate * torch.sign(load_E.mean() - load_E)
        assert expected_E.abs().sum() > 0  # tiny random router: the load is not uniform
        torch.testing.assert_close(lm.blocks[rec.layer].ffn.router.expert_bias, expected_E)
    # eval forwards count no load, so a following update changes nothing
    biases = [b.ffn.router.expert_bias.clone() for b in lm.blocks]
    with torch.no_grad():
        lm.eval()(idx_BS)
    lm.update_bias()
    for block, bias in zip(lm.blocks, biases):
        torch.testing.assert_close(block.ffn.router.expert_bias, bias)


# gshard's random second choice in the default run; deepseek_v3's bias state in the slow run
@pytest.mark.parametrize("variant", some_slow(["gshard", "deepseek_v3"], ["deepseek_v3"]))
def test_same_seed_same_losses(variant):
    def run() -> list[float]:
        torch.manual_seed(123)  # model init, and gshard's random second choice
        return train(tiny_lm(variant).train(), cycle_batches(20, 2, 16), lr=3e-3)

    first, second = run(), run()
    assert max(abs(a - b) for a, b in zip(first, second)) <= 1e-6
    assert len(set(first)) > 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(d_model=30, n_heads=4), "d_model=30 must be divisible by n_heads=4"),
        (dict(n_layers=2, moe_every=3), "moe_every=3 must be <= n_layers=2"),
        (dict(seq_len=0), "seq_len=0 must be >= 1"),
        (dict(dropout=1.0), "dropout=1.0 must be < 1"),
        (dict(tie_embeddings="yes"), "tie_embeddings='yes' must be true or false"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        LMConfig(**fields)


def test_build_errors():
    cfg = LMConfig(d_model=D, n_heads=4, seq_len=8)
    with pytest.raises(ValueError, match="variant d_model=64 must equal model d_model=32"):
        build_lm("switch", {**TINY["switch"], "d_model": 64}, cfg)
    with pytest.raises(ValueError, match="variant='nope' is not one of"):
        build_lm("nope", {}, cfg)
    with pytest.raises(ValueError, match="sequence length 9 must be <= seq_len=8"):
        build_lm("switch", TINY["switch"], cfg)(random_tokens(1, 9))


def test_deepseek_v4_routes_its_first_moe_blocks_by_token_id():
    """`hash_layers` = 2 of 3 MoE blocks: blocks 0 and 1 take their experts from their own id
    tables (seeds hash_seed + 0, + 1), indexed by the LM's input ids; block 2 learns."""
    fields = dict(TINY["deepseek_v4"], hash_layers=2, hash_seed=5)
    lm = build_lm("deepseek_v4", fields, LMConfig(d_model=D, n_layers=3, n_heads=4, seq_len=32))
    idx_BS = random_tokens(2, 12)
    out = lm(idx_BS)
    tables = [variants.hash_routing.random_hash_table(256, 8, 2, seed) for seed in (5, 6)]
    for rec, table in zip(out.layers[:2], tables):
        assert lm.blocks[rec.layer].ffn.cfg.uses_token_ids
        got_TK = rec.routing.expert.view(-1, 2)  # token-major, K per token
        assert torch.equal(got_TK, table[idx_BS.reshape(-1)])
    assert not torch.equal(tables[0], tables[1])
    assert not lm.blocks[2].ffn.cfg.uses_token_ids
    assert hasattr(lm.blocks[2].ffn.router, "expert_bias")
