"""The released models' routing rules on hand-checkable inputs: deepseek_v3's `score` options
(ERNIE-4.5 softmax, DeepSeek-V4 sqrt(softplus)), longcat_flash's biased softmax over FFN and
identity experts, and hash routing's id table.

Expected values come from the formulas with plain Python floats; logits are pinned
(tests/variants/helpers.with_logits, or by hand for the LongCat pool).
"""

from __future__ import annotations

import math

import pytest
import torch

import variants
from variants.hash_routing import random_hash_table

from .helpers import with_logits
from .test_headline_routing import assert_kept, softmax

V3 = dict(num_groups=1, topk_groups=1, num_shared_experts=0)
LOGITS = [[1.0, -1.0, 0.5, 2.0], [0.0, 0.3, -0.2, 0.1]]


def sqrtsoftplus(v: float) -> float:
    return math.sqrt(math.log1p(math.exp(v)))


@pytest.mark.parametrize(
    ("score", "fn"),
    [("softmax", None), ("sqrtsoftplus", sqrtsoftplus)],
)
def test_deepseek_v3_score_options_select_and_weigh_by_that_score(score, fn) -> None:
    layer, x = with_logits(
        "deepseek_v3", torch.tensor(LOGITS), top_k=2, routed_scaling_factor=1.5, score=score, **V3
    )
    with torch.no_grad():  # the bias lifts expert 1 into every token's top-2
        layer.router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    r = layer.eval()(x).routing
    expected = []
    for t, row in enumerate(LOGITS):
        s = softmax(row) if fn is None else [fn(v) for v in row]
        rest = max((i for i in range(4) if i != 1), key=lambda i: s[i])
        expected += [(t, e, 1.5 * s[e] / (s[1] + s[rest])) for e in (1, rest)]
    assert_kept(r, expected)


def test_deepseek_v3_unknown_score_names_the_choices() -> None:
    with pytest.raises(ValueError, match="score='relu' is not one of 'sigmoid', 'softmax'"):
        variants.make_config("deepseek_v3", score="relu", **V3)


# ------------------------------------------------------------------------------ longcat_flash


def longcat(logits_TP: list[list[float]], E: int, **fields):
    """A longcat_flash layer whose pool logits are exactly `logits_TP` on x = I (d_model = T)."""
    t = torch.tensor(logits_TP)
    T, P = t.shape
    layer = variants.build(
        "longcat_flash", d_model=T, num_experts=E, num_identity_experts=P - E, expert_hidden=4,
        **fields,
    )  # fmt: skip
    with torch.no_grad():
        layer.router.weight.copy_(t[:, :E].T)
        layer.router.zc_weight.copy_(t[:, E:].T)
    return layer, torch.eye(T)


def test_longcat_flash_softmax_over_the_pool_bias_selects_scale_weighs() -> None:
    # 2 FFN experts (0, 1) and 2 identity experts (2, 3); K = 2, scale 6
    logits = [[2.0, 0.0, 1.0, -1.0], [0.0, 0.5, 0.2, 3.0], [1.0, 1.2, -2.0, -2.0]]
    layer, x = longcat(logits, E=2, top_k=2, routed_scaling_factor=6.0)
    with torch.no_grad():  # identity expert 2 is lifted into every token's top-2
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
        layer.experts.w2.zero_()  # FFN outputs 0: y is the identity experts' part alone
    out = layer.eval()(x)
    ffn, identity_T = [], []
    for t, row in enumerate(logits):
        p = softmax(row)
        biased = [p[i] + (1.0 if i == 2 else 0.0) for i in range(4)]
        top = sorted(range(4), key=lambda i: -biased[i])[:2]
        ffn += [(t, e, 6.0 * p[e]) for e in top if e < 2]
        identity_T.append(sum(6.0 * p[e] for e in top if e >= 2))
    assert_kept(out.routing, ffn)
    assert out.routing.scores.shape == (3, 2)  # FFN columns of the pool's softmax
    torch.testing.assert_close(out.y, torch.diag(torch.tensor(identity_T)))
    assert out.extras["pool_load"].tolist() == [1, 1, 3, 1]


def test_longcat_flash_bias_update_is_v3_sign_rule_over_the_pool() -> None:
    logits = [[2.0, 0.0, 1.0, -1.0], [0.0, 0.5, 0.2, 3.0], [1.0, 0.5, -2.0, -2.0]]
    layer, x = longcat(logits, E=2, top_k=1, bias_update_rate=0.25)
    layer.train()(x)  # top-1 loads over the pool: expert 0, identity 3, expert 0 -> [2, 0, 0, 1]
    assert layer.router.load_count.tolist() == [2, 0, 0, 1]
    layer.update_bias()  # mean load 0.75: b += 0.25 * sign(0.75 - load)
    assert layer.router.expert_bias.tolist() == [-0.25, 0.25, 0.25, -0.25]
    assert not layer.router.load_count.any()
    layer.eval()(x)  # eval forwards count nothing
    assert not layer.router.load_count.any()


def test_longcat_flash_ffn_count_per_token_varies_and_identity_is_free() -> None:
    logits = [[2.0, 1.5, 0.0, -1.0], [0.0, 0.5, 0.2, 3.0], [-2.0, -2.0, 1.0, 1.5]]
    layer, x = longcat(logits, E=2, top_k=2)
    r = layer.eval()(x).routing
    assert variants.experts_per_token(r).tolist() == [2, 1, 0]
    assert layer.cfg.variable_k and layer.cfg.ffn_experts_per_token(r) == 1.0


# ------------------------------------------------------------------------------------- hash


def test_random_hash_table_is_seeded_with_k_distinct_experts_per_id() -> None:
    table = random_hash_table(vocab_size=50, num_experts=6, k=3, seed=1)
    assert table.shape == (50, 3) and table.dtype == torch.long
    assert all(len(set(row)) == 3 for row in table.tolist())
    assert ((table >= 0) & (table < 6)).all()
    assert torch.equal(table, random_hash_table(50, 6, 3, seed=1))
    assert not torch.equal(table, random_hash_table(50, 6, 3, seed=2))
    # every expert is some id's first choice: a uniform draw over 50 ids and 6 experts
    assert set(table[:, 0].tolist()) == set(range(6))


def test_hash_routes_by_the_table_top1_weight_is_the_scale() -> None:
    layer = variants.build("hash", d_model=4, num_experts=4, expert_hidden=4, vocab_size=10)
    ids = torch.tensor([[3, 3, 7], [0, 9, 3]])
    out = layer.eval()(torch.randn(2, 3, 4), token_ids=ids)
    assert out.routing.expert.tolist() == layer.router.tid2eid[ids.reshape(-1), 0].tolist()
    assert out.routing.weight.tolist() == [1.0] * 6  # Roller et al.: the FFN is not gated
    assert out.losses == {}


def test_hash_top_k_weights_are_normalised_scores_of_the_table_experts() -> None:
    layer, x = with_logits(
        "hash", torch.tensor(LOGITS), top_k=2, vocab_size=5, score="sigmoid",
        routed_scaling_factor=2.0,
    )  # fmt: skip
    with torch.no_grad():
        layer.router.tid2eid.copy_(torch.tensor([[0, 1], [2, 3], [3, 1], [0, 2], [1, 2]]))
    r = layer.eval()(x, token_ids=torch.tensor([2, 4])).routing
    expected = []
    for t, (row, pair) in enumerate(zip(LOGITS, [(3, 1), (1, 2)])):
        s = [1 / (1 + math.exp(-v)) for v in row]
        expected += [(t, e, 2.0 * s[e] / (s[pair[0]] + s[pair[1]])) for e in pair]
    assert_kept(r, expected)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (None, "token_ids=None: hash routing chooses experts by token id"),
        (torch.tensor([1, 2]), r"token_ids shape \(2,\) holds 2 ids; it must hold one per"),
        (torch.tensor([1, 2, 10]), "token id 10 must be in 0..vocab_size-1=9"),
        (torch.tensor([1, -1, 2]), "token id -1 must be in 0..vocab_size-1=9"),
        (torch.tensor([1.0, 2.0, 3.0]), "token_ids dtype=torch.float32 must be an integer"),
    ],
)
def test_hash_bad_token_ids_are_one_line_errors(ids, message) -> None:
    layer = variants.build("hash", d_model=4, num_experts=4, expert_hidden=4, vocab_size=10)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(3, 4), token_ids=ids)


def test_layers_that_do_not_route_by_id_ignore_token_ids() -> None:
    fields = {"switch": dict(top_k=1), "deepseek_v3": dict(top_k=2, **V3), "dense": {}}
    for name in ("switch", "deepseek_v3", "moe_plus_plus", "longcat_flash", "dense"):
        extra = fields.get(name, dict(top_k=2))
        layer = variants.build(name, d_model=8, num_experts=4, expert_hidden=4, **extra).eval()
        x = torch.randn(2, 3, 8)
        a, b = layer(x), layer(x, token_ids=torch.zeros(2, 3, dtype=torch.long))
        torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)


def test_deepseek_v4_at_depth_gives_hash_layers_with_the_same_weighting() -> None:
    v4 = variants.make_config("deepseek_v4", d_model=8, num_experts=8, top_k=2, hash_layers=2)
    first, second, third = (v4.at_depth(i) for i in range(3))
    assert type(first).__name__ == "HashConfig" and first.hash_seed == 0 and second.hash_seed == 1
    assert third is v4
    for name in ("num_experts", "top_k", "score", "routed_scaling_factor", "num_shared_experts"):
        assert getattr(first, name) == getattr(v4, name)
    assert (v4.score, v4.routed_scaling_factor, v4.num_shared_experts) == ("sqrtsoftplus", 1.5, 1)
