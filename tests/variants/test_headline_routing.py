"""Routing of the headline variants against their papers' formulas, on hand-checkable inputs.

Expected values are computed here from the formulas with plain Python floats, never by
calling the implementation: logits are pinned (tests/variants/helpers.with_logits) so the
router's arithmetic is known exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from .helpers import with_logits


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def kept(routing) -> list[tuple[int, int, float]]:
    """Kept assignments as sorted (token, expert, weight) triples."""
    rows = zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist())
    return sorted(rows)


def assert_kept(routing, expected: list[tuple[int, int, float]]) -> None:
    got = kept(routing)
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in sorted(expected)]
    for (_, _, w), (_, _, w_exp) in zip(got, sorted(expected)):
        assert w == pytest.approx(w_exp, rel=1e-6)


# --------------------------------------------------------------------------------- switch


SWITCH_LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-1.0, -2.0, 1.5], [1.0, 0.0, 0.9]]


def test_switch_top1_weight_is_the_unrenormalised_probability() -> None:
    layer, x = with_logits("switch", torch.tensor(SWITCH_LOGITS), capacity_factor=None)
    r = layer.eval()(x).routing
    expected = []
    for t, row in enumerate(SWITCH_LOGITS):
        p = softmax(row)
        e = max(range(3), key=p.__getitem__)
        expected.append((t, e, p[e]))
    assert_kept(r, expected)
    assert r.demand.tolist() == r.load.tolist() == [2, 1, 1]


def test_switch_capacity_drops_later_tokens_first() -> None:
    # 8 tokens, 4 experts, capacity ceil(1.0 * 8 * 1 / 4) = 2. Tokens 1,2,4,6,7 want expert 0.
    want = [1, 0, 0, 2, 0, 3, 0, 0]
    logits = torch.full((8, 4), -1.0)
    logits[torch.arange(8), torch.tensor(want)] = 1.0
    layer, x = with_logits("switch", logits, capacity_factor=1.0)
    r = layer.train()(x).routing
    assert r.capacity == 2
    assert r.demand.tolist() == [5, 1, 1, 1]
    assert r.load.tolist() == [2, 1, 1, 1]
    on_zero = sorted(t for t, e in zip(r.token.tolist(), r.expert.tolist()) if e == 0)
    assert on_zero == [1, 2]  # the two earliest of tokens 1, 2, 4, 6, 7
    out = layer(x)
    assert not out.y[[4, 6, 7]].any()  # dropped tokens get nothing (no shared experts)


def test_switch_balance_and_z_loss_follow_the_formulas() -> None:
    coef, zcoef, E, T = 0.01, 1e-3, 3, 4
    layer, x = with_logits(
        "switch", torch.tensor(SWITCH_LOGITS), capacity_factor=None, z_loss_coef=zcoef
    )
    out = layer.train()(x)
    probs = [softmax(row) for row in SWITCH_LOGITS]
    top1 = [max(range(E), key=p.__getitem__) for p in probs]
    f = [top1.count(i) / T for i in range(E)]
    P = [sum(p[i] for p in probs) / T for i in range(E)]
    balance = coef * E * sum(fi * Pi for fi, Pi in zip(f, P))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in SWITCH_LOGITS]
    z = zcoef * sum(v * v for v in lse) / T
    assert out.losses["balance"].item() == pytest.approx(balance, rel=1e-5)
    assert out.losses["z"].item() == pytest.approx(z, rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(balance + z, rel=1e-5)


def test_switch_output_is_weight_times_chosen_expert() -> None:
    layer, x = with_logits("switch", torch.tensor(SWITCH_LOGITS), capacity_factor=None)
    out = layer.eval()(x)
    r = out.routing
    with torch.no_grad():
        for t, e, w in kept(r):
            torch.testing.assert_close(out.y[t], w * layer.experts.expert_ffn(e, x[t : t + 1])[0])


# --------------------------------------------------------------------------------- gshard


def test_gshard_top2_weights_are_renormalised() -> None:
    logits = [[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 0.2]]
    layer, x = with_logits("gshard", torch.tensor(logits), capacity_factor=None)
    r = layer.eval()(x).routing
    expected = []
    for t, row in enumerate(logits):
        p = softmax(row)
        e1, e2 = sorted(range(4), key=lambda i: -p[i])[:2]
        expected += [(t, e1, p[e1] / (p[e1] + p[e2])), (t, e2, p[e2] / (p[e1] + p[e2]))]
    assert_kept(r, expected)


def test_gshard_first_choices_fill_capacity_before_any_second_choice() -> None:
    # 4 tokens, 4 experts, capacity ceil(0.5 * 4 * 2 / 4) = 1.
    # token 0: first 0, second 1.  token 1: first 1, second 0.  tokens 2, 3: first 2 / 3.
    logits = torch.tensor(
        [[3.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 3.0]]
    )
    layer, x = with_logits("gshard", logits, capacity_factor=0.5)
    r = layer.eval()(x).routing  # eval: no random drop of second choices
    assert r.capacity == 1
    assert r.demand.tolist() == [2, 2, 2, 2]
    pairs = sorted(zip(r.token.tolist(), r.expert.tolist()))
    # token 0 comes first, but token 1's FIRST choice (expert 1) outranks token 0's second
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_gshard_balance_counts_first_choices_only() -> None:
    logits = [[2.0, 1.0, 0.0, -1.0], [2.5, 0.5, 1.0, 0.2], [0.0, 0.1, 2.0, 1.9]]
    layer, x = with_logits("gshard", torch.tensor(logits), capacity_factor=None)
    torch.manual_seed(0)
    out = layer.train()(x)
    probs = [softmax(row) for row in logits]
    first = [max(range(4), key=p.__getitem__) for p in probs]
    f = [first.count(i) / 3 for i in range(4)]
    P = [sum(p[i] for p in probs) / 3 for i in range(4)]
    expected = 0.01 * 4 * sum(a * b for a, b in zip(f, P))
    assert out.losses["balance"].item() == pytest.approx(expected, rel=1e-5)
    assert "z" not in out.losses  # z-loss off by default


# --------------------------------------------------------------------------------- deepseek_moe


DSM_LOGITS = [[1.0, 0.2, -0.5, 2.0, 0.0, 0.3], [0.0, 1.5, 1.4, -1.0, 0.2, 0.1]]


def test_deepseek_moe_topk_weight_is_the_softmax_score() -> None:
    layer, x = with_logits("deepseek_moe", torch.tensor(DSM_LOGITS), top_k=3)
    r = layer.eval()(x).routing
    expected = []
    for t, row in enumerate(DSM_LOGITS):
        s = softmax(row)
        expected += [(t, e, s[e]) for e in sorted(range(6), key=lambda i: -s[i])[:3]]
    assert_kept(r, expected)  # not renormalised: the three weights sum to < 1
    assert r.weight.view(2, 3).sum(-1).lt(1).all()


def test_deepseek_moe_expert_balance_uses_e_over_kt() -> None:
    E, K, T, alpha1 = 6, 3, 2, 0.01
    layer, x = with_logits("deepseek_moe", torch.tensor(DSM_LOGITS), top_k=K)
    out = layer.train()(x)
    scores = [softmax(row) for row in DSM_LOGITS]
    chosen = [sorted(range(E), key=lambda i: -s[i])[:K] for s in scores]
    f = [E / (K * T) * sum(i in c for c in chosen) for i in range(E)]
    P = [sum(s[i] for s in scores) / T for i in range(E)]
    expected = alpha1 * sum(a * b for a, b in zip(f, P))
    assert out.losses["balance"].item() == pytest.approx(expected, rel=1e-5)
    assert set(out.losses) == {"balance"}  # device loss off by default


def test_deepseek_moe_shared_experts_see_every_token() -> None:
    layer, x = with_logits("deepseek_moe", torch.tensor(DSM_LOGITS), top_k=2, num_shared_experts=2)
    out = layer.eval()(x)
    r = out.routing
    with torch.no_grad():
        for t in range(2):
            xt = x[t : t + 1]
            expected = sum(layer.shared.expert_ffn(s, xt) for s in range(2))
            for tt, e, w in kept(r):
                if tt == t:
                    expected = expected + w * layer.experts.expert_ffn(e, xt)
            torch.testing.assert_close(out.y[t : t + 1], expected)


# --------------------------------------------------------------------------------- deepseek_v3


V3 = dict(num_groups=1, topk_groups=1, num_shared_experts=0)


def test_deepseek_v3_sigmoid_weights_normalised_over_selected_and_scaled() -> None:
    logits = [[1.0, -1.0, 0.5, 2.0], [0.0, 0.3, -0.2, 0.1]]
    layer, x = with_logits(
        "deepseek_v3", torch.tensor(logits), top_k=2, routed_scaling_factor=2.5, **V3
    )
    r = layer.eval()(x).routing
    expected = []
    for t, row in enumerate(logits):
        s = [sigmoid(v) for v in row]
        top = sorted(range(4), key=lambda i: -s[i])[:2]
        expected += [(t, e, 2.5 * s[e] / sum(s[i] for i in top)) for e in top]
    assert_kept(r, expected)
    torch.testing.assert_close(r.scores, torch.sigmoid(torch.tensor(logits)))


def test_deepseek_v3_bias_selects_but_never_weighs() -> None:
    logits = [[1.0, -1.0, 0.5, 2.0]]
    layer, x = with_logits("deepseek_v3", torch.tensor(logits), top_k=2, **V3)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    r = layer.eval()(x).routing
    s = [sigmoid(v) for v in logits[0]]
    # biased scores: expert 1 jumps to the top; expert 3 stays second
    assert_kept(r, [(0, 1, s[1] / (s[1] + s[3])), (0, 3, s[3] / (s[1] + s[3]))])


def test_deepseek_v3_node_limited_group_score_is_sum_of_top_k_over_groups() -> None:
    # 8 experts in 4 groups of 2; K=4 from topk_groups=2 groups, so a group scores the sum of
    # its top K/topk_groups = 2 experts. Group 0 has the single best expert (3.0) but a weak
    # partner: by max it would win, by sum (as specified) groups 1 and 2 win.
    logits = torch.tensor([[3.0, -3.0, 2.0, 1.9, 1.8, 1.8, -1.0, -1.0]])
    layer, x = with_logits(
        "deepseek_v3", logits, top_k=4, num_groups=4, topk_groups=2, num_shared_experts=0
    )
    r = layer.eval()(x).routing
    s = [sigmoid(v) for v in logits[0].tolist()]
    sums = [s[2 * g] + s[2 * g + 1] for g in range(4)]
    best_groups = sorted(range(4), key=lambda g: -sums[g])[:2]
    assert sorted(best_groups) == [1, 2]
    assert sorted(r.expert.tolist()) == [2, 3, 4, 5]


def test_deepseek_v3_never_leaves_the_chosen_groups() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g)
    layer, x = with_logits(
        "deepseek_v3", logits, top_k=6, num_groups=8, topk_groups=3, num_shared_experts=0
    )
    r = layer.eval()(x).routing
    groups_per_token = [set() for _ in range(64)]
    for t, e in zip(r.token.tolist(), r.expert.tolist()):
        groups_per_token[t].add(e // 2)
    assert all(len(gs) <= 3 for gs in groups_per_token)


def test_deepseek_v3_sequence_wise_balance_per_sequence_then_mean() -> None:
    E, K, S, alpha = 4, 2, 3, 1e-4
    logits = [[1.0, -1.0, 0.5, 2.0], [0.0, 0.3, -0.2, 0.1], [2.0, 1.0, -1.0, 0.0]]
    logits += [[-1.0, 0.0, 1.0, 0.5], [0.7, 0.2, -0.4, 1.1], [0.0, 0.0, 1.0, 2.0]]
    layer, x_TD = with_logits("deepseek_v3", torch.tensor(logits), top_k=K, **V3)
    out = layer.train()(x_TD.view(2, S, 6))  # two sequences of three tokens
    per_seq = []
    for b in range(2):
        rows = logits[b * S : (b + 1) * S]
        s = [[sigmoid(v) for v in row] for row in rows]
        chosen = [sorted(range(E), key=lambda i: -si[i])[:K] for si in s]
        f = [E / (K * S) * sum(i in c for c in chosen) for i in range(E)]
        P = [sum(si[i] / sum(si) for si in s) / S for i in range(E)]
        per_seq.append(sum(a * b for a, b in zip(f, P)))
    expected = alpha * sum(per_seq) / 2
    assert out.losses["balance"].item() == pytest.approx(expected, rel=1e-5)


def test_deepseek_v3_bias_update_rule_and_eval_changes_nothing() -> None:
    rate = 1e-3
    # 4 tokens, K=1: experts chosen 0, 0, 0, 2 -> load [3, 0, 1, 0], mean 1
    logits = torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0]])
    layer, x = with_logits("deepseek_v3", logits, top_k=1, bias_update_rate=rate, **V3)
    bias = layer.router.expert_bias
    layer.eval()(x)
    layer.update_bias()  # eval forwards counted nothing
    assert not bias.any()
    layer.train()(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()(x)  # eval forwards change no state at all
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    layer.update_bias()
    # b_i += rate * sign(mean_load - load_i): overloaded expert 0 goes down, idle ones go up
    torch.testing.assert_close(bias, torch.tensor([-rate, rate, 0.0, rate]))
    layer.update_bias()  # the count was reset: nothing since the last call
    torch.testing.assert_close(bias, torch.tensor([-rate, rate, 0.0, rate]))


# --------------------------------------------------------------------------------- dense


def test_dense_is_one_ffn_of_width_d_ff() -> None:
    import variants

    layer = variants.build("dense", d_model=8, d_ff=24, activation="swiglu").eval()
    x = torch.randn(5, 8)
    bank = layer.experts
    expected = (torch.nn.functional.silu(x @ bank.w1[0]) * (x @ bank.w3[0])) @ bank.w2[0]
    torch.testing.assert_close(layer(x).y, expected)
    assert bank.w1.shape == (1, 8, 24)
    default = variants.build("dense", d_model=8, expert_hidden=16, top_k=2, num_shared_experts=1)
    assert default.experts.w1.shape == (1, 8, 48)  # same active width as that MoE


def test_deepseek_v3_bias_stays_float32_when_the_layer_is_cast_to_bf16() -> None:
    logits = torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0]])
    layer, x = with_logits("deepseek_v3", logits, top_k=1, bias_update_rate=1e-3, **V3)
    layer = layer.to(torch.bfloat16).train()
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.experts.w1.dtype == torch.bfloat16
    for _ in range(1000):
        layer.router.load_count += torch.tensor([3, 0, 1, 0])
        layer.update_bias()
    # 1000 steps of +-1e-3 in bf16 would stall near 0.5; in fp32 they reach 1.0
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-1.0, 1.0, 0.0, 1.0]))
    layer(x.to(torch.bfloat16))  # routing still runs with the fp32 bias
