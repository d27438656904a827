"""expert_choice against Zhou et al. 2022 (arXiv:2202.09368, Eq. 1-2): experts pick tokens."""

from __future__ import annotations

import math

import pytest
import torch

import variants

from .helpers import with_logits


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "capacity_factor"),
    [(10, 4, 2), (7, 3, 1), (8, 8, 2), (5, 2, 2), (9, 4, 3)],
)
def test_each_expert_takes_ceil_cf_t_over_e_tokens(
    num_tokens: int, num_experts: int, capacity_factor: int
) -> None:
    capacity = math.ceil(capacity_factor * num_tokens / num_experts)
    layer, x = with_logits(
        "expert_choice",
        torch.randn(num_tokens, num_experts),
        capacity_factor=capacity_factor,
        top_k=capacity_factor,
    )
    routing = layer(x).routing
    assert routing.capacity == capacity
    assert routing.demand.tolist() == [capacity] * num_experts
    assert routing.load.tolist() == [capacity] * num_experts
    for e in range(num_experts):  # C distinct tokens per expert
        assert routing.token[routing.expert == e].unique().numel() == capacity


def test_each_expert_takes_its_highest_scoring_tokens_weighted_by_score() -> None:
    T, E = 12, 4
    logits = torch.randn(T, E) * 2
    layer, x = with_logits("expert_choice", logits)
    routing = layer(x).routing
    scores = torch.softmax(logits, -1)
    C = math.ceil(2 * T / E)
    for e in range(E):
        mask = routing.expert == e
        best = sorted(range(T), key=lambda t: -scores[t, e].item())[:C]
        assert set(routing.token[mask].tolist()) == set(best)
        for t, w in zip(routing.token[mask].tolist(), routing.weight[mask].tolist(), strict=True):
            assert w == pytest.approx(scores[t, e].item(), rel=1e-6)


def test_a_token_may_get_no_expert_or_several() -> None:
    # C = ceil(1 * 3 / 3) = 1. Scores: token 0 (1/3, 1/3, 1/3); token 1 ~ (0, 0, 1);
    # token 2 ~ (0.47, 0.47, 0.06). Experts 0 and 1 both take token 2, expert 2 takes token 1.
    logits = torch.tensor([[0.0, 0.0, 0.0], [-5.0, -5.0, 5.0], [-1.0, -1.0, -3.0]])
    layer, x = with_logits("expert_choice", logits, capacity_factor=1, top_k=1)
    out = layer(x)
    per_token = torch.bincount(out.routing.token, minlength=3).tolist()
    assert per_token == [0, 1, 2]
    assert set(out.routing.expert[out.routing.token == 2].tolist()) == {0, 1}
    assert not out.y[0].any()  # unrouted and no shared experts: zero output


def test_routing_of_a_token_depends_on_later_tokens() -> None:
    # the documented causal leak: C = 2; changing only token 3 moves token 2 to another expert
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    layer, x = with_logits("expert_choice", logits, capacity_factor=1, top_k=1)
    before = layer(x[None])
    x_later = x.clone()
    x_later[3] = 3 * x[0]  # token 3 now outranks token 2 for expert 0
    after = layer(x_later[None])
    assert before.routing.expert[before.routing.token == 2].tolist() == [0]
    assert after.routing.expert[after.routing.token == 2].tolist() == [1]
    assert not torch.allclose(before.y[0, 2], after.y[0, 2])
    assert variants.make_config("expert_choice").leaks_future_tokens


def test_no_losses_and_the_same_routing_in_train_and_eval() -> None:
    layer, x = with_logits("expert_choice", torch.randn(10, 4))
    train = layer.train()(x)
    evaluated = layer.eval()(x)
    assert train.losses == {} and train.aux_loss.item() == 0
    assert evaluated.losses == {}
    assert torch.equal(train.routing.token, evaluated.routing.token)
    assert torch.equal(train.routing.expert, evaluated.routing.expert)


def test_uniform_routing_gives_every_expert_c_distinct_tokens() -> None:
    layer = variants.build(
        "expert_choice", d_model=8, num_experts=4, expert_hidden=8, force_uniform_routing=True
    )
    routing = layer(torch.randn(10, 8)).routing
    assert routing.load.tolist() == [5] * 4  # ceil(2 * 10 / 4)
    for e in range(4):
        assert routing.token[routing.expert == e].unique().numel() == 5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(capacity_factor=None), "capacity_factor=None"),
        (dict(capacity_factor=3), "top_k=2 must equal capacity_factor=3"),
        (dict(top_k=1), "top_k=1 must equal capacity_factor=2.0"),
        (dict(selection_scope="causal"), "selection_scope='causal' is not one of 'batch', 'pos"),
    ],
)
def test_invalid_fields_raise_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        variants.build("expert_choice", d_model=8, expert_hidden=8, **fields)


# selection_scope="position": the causal twin (T = B * S, token t = b * S + s)


def assignments_of(routing: variants.Routing, token: int) -> list[tuple[int, float]]:
    """(expert, weight) pairs of one token, sorted by expert."""
    mask = routing.token == token
    pairs = zip(routing.expert[mask].tolist(), routing.weight[mask].tolist(), strict=True)
    return sorted(pairs)


@pytest.mark.parametrize("scope", ["batch", "position"])
def test_a_later_token_moves_an_earlier_one_only_in_batch_scope(scope: str) -> None:
    # B = 2 sequences of S = 3; seq 0 = tokens 0..2, seq 1 = tokens 3..5; capacity_factor 1.
    # batch: C = ceil(6 / 2) = 3. Expert-0 scores sigmoid(u0 - u1): .88 .73 .27 | .12 .95 .05,
    # so expert 0 takes {4, 0, 1}. Making token 2 (seq 0's last) score ~1 for expert 0
    # pushes token 1 out, to expert 1. position: C_pos = ceil(2 / 2) = 1 among the 2 tokens of
    # each position; token 2 only competes with token 5 at position 2, so tokens 0, 1 keep theirs.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 3.0]])
    layer, x = with_logits(
        "expert_choice", logits, capacity_factor=1, top_k=1, selection_scope=scope
    )
    x_later = x.clone()
    x_later[2] = 6 * x[0]  # logits of token 2 become (12, 0)
    before, after = layer(x.view(2, 3, 6)), layer(x_later.view(2, 3, 6))
    if scope == "position":
        for t in (0, 1):
            assert assignments_of(after.routing, t) == assignments_of(before.routing, t)
        torch.testing.assert_close(after.y[0, :2], before.y[0, :2], rtol=0, atol=0)
        assert not layer.cfg.leaks_future_tokens
    else:
        assert [e for e, _ in assignments_of(before.routing, 1)] == [0]
        assert [e for e, _ in assignments_of(after.routing, 1)] == [1]
        assert not torch.allclose(after.y[0, 1], before.y[0, 1])
        assert layer.cfg.leaks_future_tokens


def test_position_scope_each_expert_takes_its_top_c_pos_tokens_at_each_position() -> None:
    # B = 3 sequences of S = 2, E = 2, capacity_factor 1: C_pos = ceil(1 * 3 / 2) = 2 of the 3
    # tokens at each position. Expert-0 scores sigmoid(u0 - u1), expert 1 the complement:
    #   position 0, tokens 0, 2, 4: e0 .88 .73 .12 -> {0, 2};  e1 .12 .27 .88 -> {4, 2}
    #   position 1, tokens 1, 3, 5: e0 .27 .05 .73 -> {5, 1};  e1 .73 .95 .27 -> {3, 1}
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.0, 2.0], [1.0, 0.0]])
    layer, x = with_logits(
        "expert_choice", logits, capacity_factor=1, top_k=1, selection_scope="position"
    )
    routing = layer(x.view(3, 2, 6)).routing
    chosen = {(s, e): set() for s in range(2) for e in range(2)}
    for t, e in zip(routing.token.tolist(), routing.expert.tolist(), strict=True):
        chosen[(t % 2, e)].add(t)
    assert chosen == {(0, 0): {0, 2}, (0, 1): {4, 2}, (1, 0): {5, 1}, (1, 1): {3, 1}}
    assert routing.token.numel() == 2 * 2 * 2  # S * E * C_pos
    assert routing.capacity == 4 and routing.load.tolist() == [4, 4]  # S * C_pos per expert
    scores = torch.softmax(logits, -1)
    expected = scores[routing.token, routing.expert]
    torch.testing.assert_close(routing.weight, expected)


def test_position_scope_uniform_routing_round_robins_each_position() -> None:
    layer = variants.build(
        "expert_choice",
        d_model=8,
        num_experts=4,
        expert_hidden=8,
        force_uniform_routing=True,
        selection_scope="position",
    )
    routing = layer(torch.randn(3, 5, 8)).routing  # C_pos = ceil(2 * 3 / 4) = 2
    assert routing.load.tolist() == [5 * 2] * 4
    for e in range(4):
        tokens = routing.token[routing.expert == e]
        assert tokens.unique().numel() == 10  # distinct
        assert torch.bincount(tokens % 5, minlength=5).tolist() == [2] * 5  # C_pos per position


def test_position_scope_needs_equal_length_sequences() -> None:
    layer = variants.build(
        "expert_choice", d_model=8, num_experts=4, expert_hidden=8, selection_scope="position"
    )
    with pytest.raises(ValueError, match="7 tokens is not divisible by num_seqs=2"):
        layer.router(torch.randn(7, 8), num_seqs=2)
