"""task=ep_sim end to end in one process: the committed trace and an untrained router, each
rule and placement a row set, a rule that cannot route a `sim_skipped` row, bad input one line."""

from __future__ import annotations

import pytest

import moe_bench
from moe_bench import results
from moe_bench.__main__ import execute
from tests.moe_bench.conftest import FAST

SMALL = ["task=ep_sim", "task.tokens_per_rank=4", "task.placements=[contiguous,eplb]"]


@pytest.mark.slow  # a whole job on the committed 1024-expert trace: seconds
def test_the_committed_trace_replays_at_every_preset_rule(tmp_path) -> None:
    cfg = moe_bench.compose(*FAST, *SMALL, "variant=ep/deepseek_v3_e1024", "task.ranks=[8,1024]")
    assert execute(cfg, tmp_path, "trace") == "ok"
    frame = results.load(tmp_path)
    straggler = frame[frame.metric == "sim_straggler"]
    assert set(straggler.rule) == {"topk", "device:1", "device:2", "device:3", "node:2"}
    assert set(straggler.placement) == {"contiguous", "eplb"}
    assert (straggler["samples"] == 2 * 3).all()  # 2 layers x the 3 steps after calibration
    skipped = frame[frame.metric == "sim_skipped"]
    assert set(skipped.rule) == {"device:1", "device:2", "device:3"}
    assert set(skipped.ranks) == {1024} and skipped.reason.str.contains("M \\* E/P >= K").all()
    devices = frame[(frame.metric == "sim_devices_per_token") & (frame.placement == "contiguous")]
    for rule, limit in (("device:1", 1), ("device:2", 2), ("device:3", 3)):
        assert (devices[devices.rule == rule]["devices_per_token_max"] <= limit).all()


@pytest.mark.slow  # builds and runs an untrained LM
def test_an_untrained_router_goes_through_the_same_path(tmp_path) -> None:
    cfg = moe_bench.compose(
        *FAST, *SMALL, "variant=deepseek_v3", "variant.num_experts=64", "variant.top_k=4",
        "variant.num_groups=1", "variant.topk_groups=1", "task.source=router",
        "task.ranks=[8,16]", "task.router_steps=2", "task.batch_size=2", "task.seq_len=16",
    )  # fmt: skip
    assert execute(cfg, tmp_path, "router") == "ok"
    frame = results.load(tmp_path)
    a2a = frame[frame.metric == "sim_a2a_us"]
    assert set(a2a.ranks) == {8, 16} and (a2a.value > 2 * 77.0).all()  # two latencies at least
    assert (a2a.value - a2a.dispatch_us - a2a.combine_us).abs().max() < 1e-9


def test_a_missing_trace_fails_the_job_naming_the_field(tmp_path) -> None:
    cfg = moe_bench.compose(*FAST, *SMALL, "task.trace=/nonexistent/trace.npz")
    assert execute(cfg, tmp_path, "missing") == "failed"
    error = results.load(tmp_path).error.dropna().iloc[0]
    assert "task.trace='/nonexistent/trace.npz': no trace at" in error
