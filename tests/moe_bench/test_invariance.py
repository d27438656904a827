"""The invariance suite (`moe_bench.invariance`): every variant with a loss or step state gives
the same auxiliary loss, gradient, counts and update whether its batch runs as one forward or
split (micro-batches, checkpointing, bf16 router; ranks in the slow run), or differs where its
config says its losses are per forward. Also: deterministic routing and top-K tie-breaking."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import variants
from moe_bench import invariance
from moe_bench.tasks.invariance import distributed_rows
from tests.slow_cases import some_slow
from variants.contract.routing import topk

# the default run splits a representative few (one loss, several losses, the bias state, the
# losses per forward, zero-computation experts, the noisy and ReLU routers); the slow run the rest
SPLIT_IN_THE_SLOW_RUN = (
    "deepseek_v2", "deepseek_v4", "gpt_oss", "gshard", "moe_plus_plus", "olmoe", "phimoe",
    "qwen3_moe", "qwen3_next", "topp", "xmoe",
)  # fmt: skip


@pytest.mark.parametrize("name", some_slow(variants.names(), SPLIT_IN_THE_SLOW_RUN))
def test_one_process_splits(name: str) -> None:
    chosen = [c for c in invariance.cases() if c.variant == name]
    rows = invariance.local_rows(chosen) if chosen else []
    assert invariance.failures(rows) == []
    if chosen:  # every one-process split ran for every config of the variant
        assert {r["split"] for r in rows} >= {"micro4", "checkpoint", "router_bf16"}
        assert len({r["case"] for r in rows}) == len(chosen)


def test_covers_every_variant_with_a_loss_or_state() -> None:
    covered = {c.variant for c in invariance.cases()}
    for name in variants.names():
        layer = variants.build(name, **invariance.small_fields(name)).train()
        out = layer(torch.randn(2, 8, layer.cfg.d_model), token_ids=torch.zeros(2, 8).long())
        if layer.cfg.uses_token_ids:  # hash routing: no loss; its id table never changes
            assert not out.losses and name not in covered, name
            continue
        has_state = bool(out.losses) or any(True for _ in layer.buffers())
        assert (name in covered) == has_state, name


def test_loss_scope_follows_every_loss_of_the_config() -> None:
    assert variants.make_config("mixtral", balance_scope="sequence").loss_scope == "sequence"
    assert variants.make_config("noisy_topk").loss_scope == "micro_batch"
    seen = dict(balance_scope="global_batch", num_devices=7)
    assert variants.make_config("deepseek_moe", **seen).loss_scope == "global_batch"
    assert variants.make_config("deepseek_moe", alpha2=0.1, **seen).loss_scope == "micro_batch"


def test_a_doubled_count_is_caught_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpointing without the state rule counts V3's load twice: the suite names it."""
    plain = lambda layer, x: checkpoint(layer, x, use_reentrant=False)
    monkeypatch.setattr(invariance, "checkpointed", plain)
    case = next(c for c in invariance.cases() if c.variant == "deepseek_v3")
    ref = invariance.measure_local(case, None)
    split = next(s for s in invariance.SPLITS if s.name == "checkpoint")
    rows = invariance.compare(case, split, ref, invariance.measure_local(case, split))
    # the sign rule of the bias update hides a doubling (every load doubles, so does the
    # mean); the counts show it
    assert invariance.failures(rows) == [
        f"{case.label} under checkpoint: counts differs by 1 (expected equal, tolerance 1e-05)"
    ]


def test_a_split_that_should_differ_and_does_not_fails() -> None:
    case = next(c for c in invariance.cases() if c.label == "mixtral · micro_batch")
    split = next(s for s in invariance.SPLITS if s.name == "micro4")
    ref = invariance.measure_local(case, None)
    rows = invariance.compare(case, split, ref, ref)  # a split that changed nothing
    assert [r["quantity"] for r in rows if not r["passed"]] == ["aux_loss", "aux_grad"]


@pytest.mark.slow  # several processes: the slow run
def test_expert_and_data_parallel_splits() -> None:
    rows = distributed_rows(timeout_s=150, collective_timeout_s=30)
    assert invariance.failures(rows) == []
    assert {r["split"] for r in rows} == {"ep2", "ep4", "dp2"}


# --- determinism and tie-breaking (docs/contract.md §2) ------------------------------------


@pytest.mark.parametrize("name", variants.names())
def test_same_seed_gives_bit_identical_routing_and_loss(name: str) -> None:
    def run() -> tuple[torch.Tensor, ...]:
        torch.manual_seed(3)
        layer = variants.build(name, **invariance.small_fields(name)).train()
        ids = torch.arange(32).view(4, 8) % 7  # read by hash routing only (vocab_size > 7)
        out = layer(torch.randn(4, 8, layer.cfg.d_model), token_ids=ids)
        r = out.routing
        return r.token, r.expert, r.weight, out.aux_loss, out.y

    for a, b in zip(run(), run()):
        assert torch.equal(a, b), name


def test_topk_ties_go_to_the_lower_index() -> None:
    scores = torch.zeros(3, 8)
    scores[1, 6] = 1.0  # one clear winner, then a tie among the rest
    values, idx = topk(scores, 3)
    assert idx.tolist() == [[0, 1, 2], [6, 0, 1], [0, 1, 2]]
    assert values[1].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["mixtral", "deepseek_moe", "gshard", "xmoe", "noisy_topk"])
def test_a_router_with_equal_logits_picks_the_lowest_experts(name: str) -> None:
    fields = dict(invariance.small_fields(name), d_model=8)
    layer = variants.build(name, **fields).eval()
    with torch.no_grad():
        for p in layer.router.parameters():
            p.zero_()
        if name == "xmoe":  # cosines of a zero embedding are 0 for every expert
            layer.router.temperature.fill_(1.0)
    r = layer(torch.randn(5, 8)).routing
    k = layer.cfg.top_k
    assert r.expert.view(5, k).tolist() == [list(range(k))] * 5, name
