"""Tasks run in process at tiny sizes; timer and memory meter; failure and resume of a job."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

import moe_bench.tasks.throughput
import variants
from moe_bench import registry, results
from moe_bench.__main__ import execute
from moe_bench.timing import LiveTensorBytes, Timing, time_steps
from tests.moe_bench.conftest import FAST
from tests.slow_cases import some_slow

FAST_THROUGHPUT = [
    *FAST, "task=throughput", "task.warmup=1", "task.repeats=3", "task.max_repeats=3"
]  # fmt: skip


def run_job(compose_cfg, out: Path, *overrides: str) -> tuple[str, pd.DataFrame]:
    status = execute(compose_cfg(*FAST, *overrides), out, " ".join(overrides))
    return status, results.load(out)


def value(frame: pd.DataFrame, metric: str, **where) -> float:
    rows = frame[frame.metric == metric]
    for key, val in where.items():
        rows = rows[rows[key] == val]
    assert len(rows) == 1, (metric, where, len(rows))
    return float(rows.value.iloc[0])


@pytest.mark.parametrize("variant", ["switch", "deepseek_v3", "dense"])
def test_throughput_rows(compose_cfg, tmp_path: Path, variant: str) -> None:
    status = execute(compose_cfg(*FAST_THROUGHPUT, f"variant={variant}"), tmp_path, variant)
    frame = results.load(tmp_path)
    assert status == "ok" and set(frame.status) == {"ok"}
    tokens = frame["model.tokens"].iloc[0]
    for p in ("fwd", "fwd_bwd"):
        ms = value(frame, f"{p}_ms", **{"pass": p})
        assert ms > 0
        assert value(frame, "tokens_per_s", **{"pass": p}) == pytest.approx(tokens / ms * 1e3)
        ratio = frame[(frame.metric == "ratio_to_dense") & (frame["pass"] == p)].iloc[0]
        # the median of the per-round ratios (test_timing.py), within their range
        assert ratio.ratio_min <= ratio.value <= ratio.ratio_max and ratio.dense_ms > 0
        assert value(frame, "tflops", **{"pass": p}) > 0
    assert frame.loc[frame.metric == "tokens_per_s", "unit"].unique().tolist() == ["tok/s"]
    assert (frame.params_total >= frame.params_active).all() and (frame.params_active > 0).all()
    assert (frame.flops_per_token > 0).all() and (frame.device == "cpu").all()


def test_memory_is_repeatable_within_5_percent(compose_cfg, tmp_path: Path) -> None:
    peaks = []
    for attempt in ("a", "b"):
        status, frame = run_job(
            compose_cfg, tmp_path / attempt, "task=memory", "task.repeats=2", "variant=gshard"
        )
        assert status == "ok"
        row = frame[frame.metric == "peak_memory_bytes"].iloc[0]
        assert row.spread <= 0.05 and row.value > row.resident_bytes
        peaks.append(row.value)
    assert abs(peaks[0] - peaks[1]) <= 0.05 * peaks[0]
    assert value(frame, "ratio_to_dense") == pytest.approx(
        peaks[1] / frame.dense_bytes.dropna().iloc[0]
    )


def test_live_tensor_bytes_counts_storages_once() -> None:
    w = torch.zeros(100)  # resident: 400 bytes
    with LiveTensorBytes([w]) as meter:
        a = torch.ones(1000)  # 4000
        view = w[10:20] * 1  # a new 40-byte tensor; the slice itself is no new storage
        b = torch.ones(500)  # 2000: peak 400 + 4000 + 40 + 2000
        del a
        c = torch.ones(200)  # a is gone by now
    assert meter.peak == 400 + 4000 + 40 + 2000
    assert meter.current == 400 + 40 + 2000 + 800
    del view, b, c


def test_timing_statistics_and_call_counts() -> None:
    t = Timing([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median_ms == 3.0 and t.iqr_ms == 2.0  # robust to the outlier
    assert Timing([5.0]).iqr_ms == 0.0
    calls = []
    timing = time_steps(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=4, desc="t")
    assert len(calls) == 6 and len(timing.samples_ms) == 4


def test_balance_rows_real_text_and_skewed(compose_cfg, tmp_path: Path) -> None:
    status, frame = run_job(compose_cfg, tmp_path, "task=balance", "variant=switch")
    assert status == "ok"
    assert set(frame.domain.dropna()) == {"prose", "code", "skewed"}
    for metric in ("load_entropy", "max_vio_global", "load_cv", "drop_fraction",
                   "unrouted_fraction", "dead_experts", "router_entropy"):  # fmt: skip
        assert frame[frame.metric == metric].domain.nunique() == 3
    shares = frame[frame.metric == "expert_load"].groupby("domain").value.sum()
    assert shares.to_numpy() == pytest.approx([1.0, 1.0, 1.0])
    # inputs aimed at expert 0 overload it far beyond what real text does
    assert value(frame, "max_vio_global", domain="skewed") > 2 * value(
        frame, "max_vio_global", domain="code"
    )
    assert value(frame, "drop_fraction", domain="skewed") > 0  # switch has capacity 1.25
    assert len(frame[(frame.metric == "max_vio_batch") & (frame.domain == "code")]) == 4


def test_balance_on_dense_is_trivially_balanced(compose_cfg, tmp_path: Path) -> None:
    status, frame = run_job(compose_cfg, tmp_path, "task=balance", "variant=dense")
    assert status == "ok"
    assert set(frame[frame.metric == "load_entropy"].value) == {1.0}


def test_failed_job_records_error_then_resume_redoes_only_it(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    def out_of_memory(cfg, recorder) -> None:
        recorder.log("fwd_ms", 1.0)  # a row logged before the failure is marked failed too
        raise torch.OutOfMemoryError("CUDA out of memory (raised on purpose)")

    throughput = dataclasses.replace(registry.lookup("throughput"), run=out_of_memory)
    monkeypatch.setitem(registry.TASKS, "throughput", throughput)
    cfg = compose_cfg(*FAST_THROUGHPUT)
    assert execute(cfg, tmp_path, "oom") == "failed"
    frame = results.load(tmp_path)
    assert set(frame.status) == {"failed"}
    assert frame.error.iloc[0] == "OutOfMemoryError: CUDA out of memory (raised on purpose)"
    assert frame.params_total.notna().all()  # base columns still present
    monkeypatch.undo()
    assert execute(cfg, tmp_path, "again") == "ok"
    assert execute(cfg, tmp_path, "third") == "skipped"
    assert set(results.load(tmp_path).status) == {"ok"}


def test_impossible_config_leaves_a_failed_row(compose_cfg, tmp_path: Path) -> None:
    status, frame = run_job(compose_cfg, tmp_path, "model.tokens=-64")
    assert status == "failed"
    row = frame.iloc[-1]
    assert (row.metric, row.status, row.variant) == ("job", "failed", "switch")
    assert row.error == "model: tokens=-64 must be >= 1"


def test_task_registry_errors() -> None:
    with pytest.raises(ValueError, match="task='nope' is not one of 'balance'"):
        registry.lookup("nope")
    assert registry.lookup("throughput") is moe_bench.tasks.throughput.TASK
    assert registry.lookup("throughput").run is moe_bench.tasks.throughput.run


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task", ["throughput", "memory", "balance"])
def test_cuda_tasks(compose_cfg, tmp_path: Path, task: str) -> None:
    cfg = compose_cfg("model=tiny", "device=cuda", f"task={task}", "backend=grouped")
    assert execute(cfg, tmp_path, task) == "ok"
    frame = results.load(tmp_path)
    assert set(frame.device) == {"cuda"} and set(frame.status) == {"ok"}
    assert results.load_env(tmp_path)[0]["gpu_model"]
    if task == "memory":
        row = frame[frame.metric == "peak_memory_bytes"].iloc[0]
        assert row.value > row.resident_bytes and row.spread <= 0.05


# the default run balances a representative few (top-1, shared experts, the bias state, X-MoE's
# projected centroid, expert choice, hash routing's refusal); the slow run the rest
BALANCED_IN_THE_SLOW_RUN = (
    "deepseek_v2", "deepseek_v4", "gpt_oss", "gshard", "llama4", "longcat_flash", "mixtral",
    "moe_plus_plus", "noisy_topk", "olmoe", "phimoe", "qwen3_moe", "qwen3_next", "remoe",
    "sinkhorn", "topp",
)  # fmt: skip
ROUTED = sorted(set(variants.names()) - {"dense"})


@pytest.mark.parametrize("variant", some_slow(ROUTED, BALANCED_IN_THE_SLOW_RUN))
def test_balance_task_runs_for_every_routed_variant(compose_cfg, tmp_path, variant) -> None:
    """The skewed inputs lean toward expert 0's centroid in input space, which each router
    gives (`Router.centroid`; X-MoE's lives in its projected space)."""
    status, frame = run_job(
        compose_cfg, tmp_path, "task=balance", f"variant={variant}", "task.batches=1"
    )
    if variants.lookup(variant).config.uses_token_ids:  # the layer-level tasks feed no ids
        assert status == "failed"
        assert "token_ids=None: hash routing chooses experts by token id" in frame.error.iloc[-1]
        return
    assert status == "ok", frame.error.dropna().unique()
    skewed = frame[(frame.metric == "max_vio_global") & (frame.domain == "skewed")]
    assert len(skewed) == 1
