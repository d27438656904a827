"""Recorder rows and the run card (moe_bench.recorder), atomic files, resume check, and loading a
sweep (moe_bench.results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_bench import results
from moe_bench.recorder import Recorder, write_env

BASE = {"variant": "switch", "task": "throughput", "seed": 0, "model.d_model": 32}


def rows(path: Path) -> list[dict]:
    got, problems = results.read_rows(path)
    assert problems == []
    return got


def test_rows_carry_base_metric_and_status(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, BASE)
    rec.log("fwd_ms", torch.tensor(1.5), unit="ms", **{"pass": "fwd"})
    rec.log("load_entropy", float("nan"), step=3, domain="code", layer=0)
    rec.finish()
    got = rows(tmp_path)
    assert [r["metric"] for r in got] == ["fwd_ms", "load_entropy", "job"]
    assert {k: v for k, v in got[0].items() if v is not None} == {
        **BASE, "metric": "fwd_ms", "value": 1.5, "unit": "ms", "pass": "fwd", "status": "ok",
    }  # fmt: skip
    assert got[0]["step"] is None and got[0]["error"] is None
    assert got[1]["value"] is None and got[1]["step"] == 3  # non-finite -> null
    assert got[2]["unit"] == "s" and got[2]["value"] >= 0
    assert results.completed(tmp_path)


def test_failed_job_marks_every_row(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, BASE)
    rec.log("fwd_ms", 1.0)
    rec.finish("failed", "OutOfMemoryError: boom")
    got = rows(tmp_path)
    assert {(r["status"], r["error"]) for r in got} == {("failed", "OutOfMemoryError: boom")}
    assert got[-1]["metric"] == "job"
    assert not results.completed(tmp_path)
    assert not results.completed(tmp_path / "never_ran")
    with pytest.raises(ValueError, match="status='done' is not one of"):
        Recorder(tmp_path, BASE).finish("done")


def test_flush_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, BASE)
    rec.log("fwd_ms", 1.0)
    rec.flush()
    rec.log("tflops", 2.0)
    rec.flush()
    assert [r["metric"] for r in rows(tmp_path)] == ["fwd_ms", "tflops"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rows-00000.parquet",
        "rows-00001.parquet",
    ]
    rec.flush()  # nothing new: no empty part
    assert len(list(tmp_path.iterdir())) == 2


def test_load_concatenates_jobs_in_natural_order(tmp_path: Path) -> None:
    for job in (10, 2, 0):
        rec = Recorder(tmp_path / str(job), {**BASE, "seed": job})
        rec.log("fwd_ms", float(job))
        rec.finish()
        write_env(tmp_path / str(job), torch.device("cpu"))
    frame = results.load(tmp_path)
    assert list(frame["job_dir"].unique()) == ["0", "2", "10"]
    assert len(frame) == 6
    assert list(frame.columns[:5]) == ["variant", "task", "seed", "metric", "value"]
    assert frame.loc[frame.metric == "fwd_ms", "value"].tolist() == [0.0, 2.0, 10.0]
    envs = results.load_env(tmp_path)
    assert [e["job_dir"] for e in envs] == ["0", "2", "10"]
    assert envs[0]["torch"] == torch.__version__ and envs[0]["threads"] >= 1
    assert {"git_commit", "command", "cpu_model", "gpu_model", "device"} <= envs[0].keys()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        results.load(tmp_path / "missing")
    with pytest.raises(
        ValueError, match=r"is not a sweep directory: no rows-\*\.parquet or results\.jsonl"
    ):
        results.load(tmp_path)


def test_a_job_killed_after_a_flush_is_not_complete(tmp_path: Path) -> None:
    """Rows flushed mid-run are ok rows, but only the final `job` row marks a finished job."""
    recorder = Recorder(tmp_path, BASE)
    recorder.log("train_loss", 2.5, step=1)
    recorder.flush()
    assert (tmp_path / "rows-00000.parquet").is_file()
    assert not results.completed(tmp_path)
    recorder.finish("ok")
    assert results.completed(tmp_path)


def test_load_keeps_layer_as_int_or_mean(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "0", BASE)
    recorder.log("load_entropy", 0.9, layer=0)
    recorder.log("load_entropy", 0.8, layer="mean")
    recorder.finish("ok")
    layers = results.load(tmp_path)["layer"].tolist()
    assert layers[:2] == [0, "mean"] and isinstance(layers[0], int)


def test_unknown_metric_names_fail_loudly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"metric='tokens_per_sec' is not one of 'fwd_ms'"):
        Recorder(tmp_path, BASE).log("tokens_per_sec", 1.0)


def test_rows_say_running_until_the_job_ends(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, BASE)
    rec.log("fwd_ms", 1.0)
    rec.flush()
    assert {r["status"] for r in rows(tmp_path)} == {"running"}
    assert results.job_state(tmp_path) == "incomplete"  # rows, no closing row, no lock held
    rec.finish("ok")
    assert {r["status"] for r in rows(tmp_path)} == {"ok"}
    assert results.job_state(tmp_path) == "ok"
    assert results.job_state(tmp_path / "never") is None


def test_read_rows_names_each_problem_and_keeps_the_rest(tmp_path: Path) -> None:
    good = json.dumps({**BASE, "metric": "fwd_ms", "value": 1.0, "status": "ok"})
    lines = [good, "[1, 2]", json.dumps({**BASE, "metric": "fwd_ms", "value": True,
             "status": "ok"}), json.dumps({**BASE, "metric": "speed", "value": 1, "status": "ok"}),
             "", good[:20]]  # fmt: skip
    path = tmp_path / results.RESULTS
    path.write_text("\n".join(lines))
    got, problems = results.read_rows(path)
    assert len(got) == 1
    assert problems[:3] == [
        f"{path}:2: not a JSON object but list",
        f"{path}:3: value=True is not a number",
        f"{path}:4: unknown metric='speed'",
    ]
    assert problems[3].startswith(f"{path}:6: not JSON (") and len(problems) == 4
    assert results.read_rows(tmp_path / "absent")[1][0].startswith(f"{tmp_path / 'absent'}: ")


def test_config_key_hash_and_diff() -> None:
    key = results.config_key({**BASE, "params_total": 10, "variant.top_k": 1})
    assert "params_total" not in key
    same = results.config_key({"variant.top_k": 1, **BASE, "params_total": 99})
    assert results.config_hash(key) == results.config_hash(same)  # order and counts aside
    other = {**key, "seed": 1, "model.tokens": 64}
    assert results.config_diff(key, other) == "seed: 0 -> 1, model.tokens: (absent) -> 64"
