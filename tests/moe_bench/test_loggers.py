"""Live loggers (moe_bench.loggers): tags, the config group, TensorBoard event files of a
convergence job that TensorBoard's own reader parses, and W&B offline where wandb is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_bench import __main__ as app
from moe_bench import loggers, results
from moe_bench.config import resolve
from moe_bench.recorder import Recorder

from .conftest import FAST

TINY = [
    *FAST, "task=convergence", "variant=switch", "task.n_layers=2", "task.seq_len=16",
    "task.batch_size=4", "task.steps=4", "task.eval_every=2", "task.eval_batches=1",
    "task.warmup_steps=1",
]  # fmt: skip
BASE = {"variant": "switch", "task": "convergence", "seed": 0}


def test_tags_name_the_metric_and_its_keys() -> None:
    row = {"metric": "expert_load", "value": 0.5, "layer": 1, "domain": "code", "expert": 3}
    assert loggers.tag(row) == "expert_load/layer=1/domain=code/expert=3"
    assert loggers.tag({"metric": "train_loss", "value": 2.0}) == "train_loss"
    assert loggers.scalar({"metric": "job", "value": 3.0}) is None
    assert loggers.scalar({"metric": "val_loss", "value": None, "step": 2}) is None


def test_the_logger_group_is_off_by_default_and_checks_its_fields(compose_cfg) -> None:
    assert resolve(compose_cfg(*TINY)).logger.name == "none"
    job = resolve(compose_cfg(*TINY, "logger=wandb"))
    assert (job.logger.name, job.logger.mode) == ("wandb", "offline")
    assert not any(k.startswith("logger") for k in job.columns)  # never the config identity
    with pytest.raises(ValueError, match="name='tb' is not one of none, tensorboard, wandb"):
        loggers.LoggerConfig(name="tb")


class Seen:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.closed = False

    def row(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        self.closed = True


def test_sinks_see_rank_0_rows_as_logged_and_close_with_the_job(tmp_path: Path) -> None:
    rank0, rank1 = Recorder(tmp_path, BASE), Recorder(tmp_path, BASE)
    rank1.prefix = "rows.rank1"
    seen0, seen1 = Seen(), Seen()
    rank0.sinks.append(seen0)
    rank1.sinks.append(seen1)
    for rec in (rank0, rank1):
        rec.log("train_loss", 2.5, step=1)
    assert [r["metric"] for r in seen0.rows] == ["train_loss"] and not seen0.closed
    rank0.finish()
    assert seen0.closed and seen0.rows[-1]["metric"] == "job" and seen1.rows == []


@pytest.mark.slow  # a training job and TensorBoard's reader
def test_a_convergence_job_writes_event_files_tensorboard_parses(compose_cfg, tmp_path) -> None:
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is in the dev extra",
    )
    assert app.execute(compose_cfg(*TINY, "logger=tensorboard"), tmp_path, "tb") == "ok"
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train_loss", "val_loss", "load_entropy/layer=0", "load_entropy/layer=mean",
        "drop_fraction/layer=1", "max_vio_batch/layer=mean", "aux_loss/loss=total",
        "expert_load/layer=0/domain=code/expert=0", "tokens_per_s/pass=fwd_bwd",
    }  # fmt: skip
    assert expected <= tags, expected - tags
    rows, _ = results.read_rows(tmp_path)
    for name in ("train_loss", "val_loss"):
        logged = [(r["step"], r["value"]) for r in rows if r["metric"] == name]
        drawn = [(e.step, e.value) for e in events.Scalars(name)]
        assert drawn == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged]


@pytest.mark.slow  # a training job
def test_wandb_logs_offline_into_the_job_folder(compose_cfg, tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="wandb is the optional extra moe-bench[wandb]")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert app.execute(compose_cfg(*TINY, "logger=wandb"), tmp_path, "wandb") == "ok"
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
