"""Rows as Parquet part files (moe_bench.rows): a killed job keeps its written parts and reads
as incomplete, bad parts are named, old JSON-lines sweeps load alike; the DuckDB view
(results.connect) and the history command (moe_bench.history) over several sweeps."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from moe_bench import history, query, results
from moe_bench import rows as parts
from moe_bench.recorder import Recorder
from moe_bench.report import load
from moe_bench.report.render import build_report

from . import report_fixtures as fx
from .conftest import FAST, ROOT, cli_env

BASE = {"variant": "switch", "task": "convergence", "seed": 0, "model.d_model": 32}
KILL_MID_WRITE = """
import os, signal, sys
import pyarrow.parquet as pq
from moe_bench.recorder import Recorder
rec = Recorder(sys.argv[1], {"variant": "switch", "task": "convergence", "seed": 0})
for step in range(1, 7):
    rec.log("train_loss", 5.0 - step, step=step)
    if step % 2 == 0 and step < 6:
        rec.flush()  # parts 0 and 1: steps 1-2, 3-4

def torn(table, where, **kwargs):  # the third part dies half-way through its temp file
    with open(where, "wb") as out:
        out.write(b"PAR1" + b"\\0" * 100)
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)

pq.write_table = torn
rec.flush()
"""


@pytest.mark.slow  # a subprocess killed while it writes
def test_a_job_killed_mid_write_reads_incomplete_with_its_earlier_parts(tmp_path: Path) -> None:
    job = tmp_path / "sweep" / "0"
    done = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE, str(job)], env=cli_env(), cwd=ROOT, timeout=120
    )
    assert done.returncode == -9  # SIGKILL, mid-write
    assert [p.name for p in parts.part_files(job)] == ["rows-00000.parquet", "rows-00001.parquet"]
    assert list(job.glob(".rows-00002.parquet.*.tmp"))  # the torn temp file, never renamed
    assert results.job_state(job) == "incomplete"
    problems: list[str] = []
    frame = results.load(tmp_path / "sweep", problems)
    assert problems == []
    assert frame["step"].tolist() == [1, 2, 3, 4] and set(frame["status"]) == {"running"}
    jobs = load.job_table(tmp_path / "sweep", frame, problems)
    assert [(j.job, j.state) for j in jobs] == [("0", "incomplete")]


@pytest.mark.slow  # a real job, killed with SIGKILL while it trains
def test_a_convergence_job_killed_while_it_runs_keeps_its_parts(tmp_path: Path) -> None:
    args = [*FAST, "task=convergence", "task.steps=100000", "task.eval_every=2",
            "task.eval_batches=1", "task.seq_len=16", "task.batch_size=2",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    code = f"import sys, runpy; sys.argv = ['moe_bench', *{args!r}]; "
    code += "runpy.run_module('moe_bench', run_name='__main__')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(parts.part_files(tmp_path / "run")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert results.job_state(tmp_path / "run") == "incomplete"
    rows, problems = results.read_rows(tmp_path / "run")
    assert problems == [] and rows and rows[-1]["metric"] != "job"
    assert {r["metric"] for r in rows} >= {"train_loss", "val_loss"}


def test_a_torn_temp_file_and_a_gap_or_a_bad_part_are_told_apart(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, BASE)
    for step in (1, 2, 3):
        rec.log("train_loss", float(step), step=step)
        rec.flush()
    (tmp_path / ".rows-00003.parquet.123.tmp").write_bytes(b"PAR1")  # ignored: never renamed
    assert results.job_state(tmp_path) == "incomplete"
    assert [r["step"] for r in results.read_rows(tmp_path)[0]] == [1, 2, 3]
    (tmp_path / "rows-00001.parquet").unlink()
    rows, problems = results.read_rows(tmp_path)
    assert rows == [] and problems == [
        f"{tmp_path / 'rows-00001.parquet'}: missing (parts up to rows-00002.parquet found); "
        "its rows are lost"
    ]
    (tmp_path / "rows-00001.parquet").write_bytes(b"not parquet")
    rows, problems = results.read_rows(tmp_path)
    assert rows == [] and problems[0].startswith(f"{tmp_path / 'rows-00001.parquet'}: not a")
    assert results.job_state(tmp_path) == "incomplete"


def test_a_failed_job_stamps_every_part(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, BASE)
    rec.log("train_loss", 2.0, step=1)
    rec.flush()
    rec.log("train_loss", 1.0, step=2)
    rec.finish("failed", "FloatingPointError: non-finite loss at step 2")
    rows, _ = results.read_rows(tmp_path)
    assert {(r["status"], r["error"]) for r in rows} == {
        ("failed", "FloatingPointError: non-finite loss at step 2")
    }
    assert results.job_state(tmp_path) == "failed"
    frame = results.load(tmp_path)
    assert set(frame["status"]) == {"failed"} and frame["error"].nunique() == 1


def test_a_column_of_mixed_types_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="column 'phase' holds values of several types"):
        parts.write_part(tmp_path, 0, [{"phase": 1}, {"phase": "train"}])


def jobs(shift: float = 0.0) -> list[list[dict]]:
    out = [fx.convergence_job(v, s) for v in ("dense", "switch") for s in (0, 1, 2)]
    for rows in out:
        for row in rows:
            if row["metric"] == "val_loss" and row["variant"] == "switch":
                row["value"] += shift
    return out


def test_parquet_and_json_lines_sweeps_load_alike(tmp_path: Path) -> None:
    new = fx.write_sweep(tmp_path / "new", jobs(), parquet=True)
    old = fx.write_sweep(tmp_path / "old", jobs())
    assert len(parts.part_files(new / "5")) > 1  # several parts per job
    a, b = results.load(new), results.load(old)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    text = lambda f: f.astype(str).replace({"nan": "None", "<NA>": "None"})  # null is null
    pd.testing.assert_frame_equal(text(a), text(b))
    assert a.loc[a["layer"].notna(), "layer"].map(type).isin([int, str]).all()


@pytest.mark.slow  # two report builds
def test_parquet_and_json_lines_sweeps_build_the_same_report(tmp_path: Path) -> None:
    sweeps = [fx.convergence_job(v, s) for v in ("dense", "switch") for s in (0, 1)]
    sweeps += [fx.throughput_job("switch"), fx.expert_parallel_job("switch")]
    pages = []
    for name, parquet in (("s", True), ("s_old", False)):
        root = fx.write_sweep(tmp_path / name / "s", sweeps, parquet=parquet)
        page = build_report(root).read_text()
        pages.append(re.sub(r"built [^<]*", "", page).replace(str(tmp_path / name), "ROOT"))
    assert pages[0] == pages[1]


def write_sweep(root: Path, commit: str, date: str, shift: float = 0.0) -> Path:
    """A sweep of dense and switch, 3 seeds each, whose jobs say they ran at `commit`."""
    fx.write_sweep(root, jobs(shift), parquet=True)
    for folder in results.job_dirs(root):
        config = results.recorded_config(folder)  # from its rows, before job.json exists
        state = {"state": "ok", "git_commit": commit, "time": date, "config": config}
        (folder / results.STATE).write_text(json.dumps(state))
    return root


def test_the_view_answers_the_readme_example_over_two_sweeps(tmp_path: Path) -> None:
    write_sweep(tmp_path / "all" / "a", "a" * 40, "2026-01-01 00:00:00 UTC")
    fx.write_sweep(tmp_path / "all" / "b", jobs(shift=-0.5))  # JSON lines, an older sweep
    assert query.BEST_VAL_LOSS in (ROOT / "README.md").read_text()
    best = results.connect(tmp_path / "all").sql(query.BEST_VAL_LOSS).df()
    frames = [results.load(tmp_path / "all" / s) for s in ("a", "b")]
    val = pd.concat(frames).query("metric == 'val_loss'")
    expected = val.groupby("variant")["value"].min().sort_values()
    assert best["arm"].tolist() == expected.index.tolist() == ["switch", "dense"]
    assert best["best_val_loss"].tolist() == pytest.approx(expected.tolist())
    assert best["jobs"].tolist() == [6, 6]  # 3 seeds of each arm in each sweep


@pytest.mark.slow  # three sweeps of six jobs written, a figure drawn twice
def test_history_draws_a_metric_across_three_sweeps_of_different_commits(tmp_path) -> None:
    dates = (f"2026-01-0{d} 00:00:00 UTC" for d in (1, 2, 3))
    for name, commit, shift in (("c", "c" * 40, 0.5), ("a", "a" * 40, 0.0), ("b", "b" * 40, 0.0)):
        write_sweep(tmp_path / name, commit, next(dates), shift)
    out = tmp_path / "history.png"
    assert history.main(["val_loss", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    con = results.connect(tmp_path)
    table = history.history(history.job_values(con, "val_loss", None, []), [], "date", "min")
    switch = table[table["arm"] == "switch"]
    assert [c[:1] for c in switch["commit"]] == ["c", "a", "b"]  # in date order
    val = [
        [r for r in fx.convergence_job("switch", s) if r["metric"] == "val_loss"] for s in range(3)
    ]
    final = [rows[-1]["value"] for rows in val]
    assert switch["mean"].tolist() == pytest.approx([sum(final) / 3 + 0.5, *[sum(final) / 3] * 2])
    assert switch["n"].tolist() == [3, 3, 3] and (switch["ci95"] > 0).all()
    assert switch["vs previous"].tolist() == ["", "better", "~"]
    dense = table[table["arm"] == "dense"]
    assert dense["vs previous"].tolist() == ["", "~", "~"]
    page = tmp_path / "h.html"
    assert history.main(["val_loss", str(tmp_path), "--where", "seed < 2", "--out", str(page)]) == 0
    assert "data:image/png;base64," in page.read_text()
    assert history.main(["val_loss", str(tmp_path), "--where", "nope = 1", "--out", str(page)]) == 2
