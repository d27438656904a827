"""`python -m moe_bench` in subprocesses: multiruns with failures and resume, joblib, bad input."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_bench import results
from moe_bench.callbacks import ReportCallback, check_writable
from tests.moe_bench.conftest import run_cli

# a task that runs out of memory on purpose, for deepseek_v3 only
OOM_PRELUDE = """
import dataclasses, torch
from moe_bench import registry
real_run = registry.TASKS['memory'].run
def run(job, recorder):
    if job.variant == "deepseek_v3":
        raise torch.OutOfMemoryError("out of memory (raised on purpose)")
    real_run(job, recorder)
registry.TASKS['memory'] = dataclasses.replace(registry.TASKS['memory'], run=run)
"""


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_multirun_goes_on_past_failures_and_resumes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m", "variant=switch,deepseek_v3", "task=throughput,memory", "model=tiny",
        "model.tokens=128,-64", "device=cpu", "task.warmup=1", "task.repeats=2",
        f"hydra.sweep.dir={sweep}", "~hydra.callbacks.report",
    ]  # fmt: skip
    first = run_cli(args, tmp_path, prelude=OOM_PRELUDE)
    assert first.returncode == 0, first.stderr
    frame = results.load(sweep)
    jobs = frame[frame.metric == "job"]
    assert len(jobs) == 8 and frame.job_dir.nunique() == 8
    failed = jobs[jobs.status == "failed"]
    assert len(failed) == 5  # 4 impossible token counts + 1 out of memory
    assert failed.error.str.contains("model: tokens=-64 must be >= 1").sum() == 4
    assert failed.error.str.contains("OutOfMemoryError").sum() == 1
    assert first.stderr.count("failed ") == 5
    assert "Traceback" not in first.stderr + first.stdout
    done = {
        d: (sweep / d / "rows-00000.parquet").stat().st_mtime_ns
        for d in jobs[jobs.status == "ok"].job_dir
    }

    second = run_cli(args, tmp_path)  # the same sweep, without the out-of-memory patch
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("skipped ") == 3
    assert {d: (sweep / d / "rows-00000.parquet").stat().st_mtime_ns for d in done} == done
    jobs = results.load(sweep).query("metric == 'job'")
    assert len(jobs) == 8 and (jobs.status == "ok").sum() == 4  # the OOM job now ran


def installed(module: str) -> bool:
    """find_spec of a dotted name raises when its parent package is missing."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(
    not installed("hydra_plugins.hydra_joblib_launcher"),
    reason="hydra-joblib-launcher not installed (pip install -e .[launchers])",
)
@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_joblib_launcher_runs_jobs_in_parallel(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "variant=switch,gshard",
        "task=memory", "task.repeats=2", "model=tiny", "device=cpu", f"hydra.sweep.dir={sweep}",
        "~hydra.callbacks.report",
    ]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    frame = results.load(sweep)
    assert sorted(frame.variant.unique()) == ["gshard", "switch"]
    assert set(frame.status) == {"ok"}
    assert proc.stdout.count("ok ") == 2


def test_report_callback_prints_the_path(tmp_path: Path, monkeypatch, capsys) -> None:
    built = []
    fake = types.ModuleType("moe_bench.report.render")
    fake.build_report = lambda sweep_dir: built.append(sweep_dir) or Path(sweep_dir, "report.html")
    monkeypatch.setitem(sys.modules, "moe_bench.report.render", fake)
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert built == [str(tmp_path)]
    assert capsys.readouterr().out == f"report: {tmp_path / 'report.html'}\n"


@pytest.mark.parametrize("problem", ["missing", "raises"])
def test_report_failure_is_one_warning_not_a_crash(tmp_path, monkeypatch, capsys, problem) -> None:
    fake = types.ModuleType("moe_bench.report.render")

    def broken(sweep_dir):
        raise RuntimeError("no figures")

    fake.build_report = broken
    monkeypatch.setitem(
        sys.modules, "moe_bench.report.render", None if problem == "missing" else fake
    )
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    out = capsys.readouterr().out
    assert out.startswith("moe_bench: warning: ") and out.count("\n") == 1
    assert ("report module missing" if problem == "missing" else "RuntimeError: no figures") in out


def test_check_writable(tmp_path: Path, capsys) -> None:
    check_writable(str(tmp_path / "new" / "dir"))  # creatable: fine
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:
        check_writable(str(tmp_path / "file" / "out"))
    assert info.value.code == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["variant=foo"], 1, "Could not find 'variant/foo'"),
        (["task=bar"], 1, "Could not find 'task/bar'"),
        (["model.tokens=-5"], 1, "model: tokens=-5 must be >= 1"),
        (["model.tokenz=5"], 1, "Key 'tokenz' not in 'ModelConfig'"),
        (
            ["hydra.run.dir=/proc/moe_bench_out"],
            2,
            "output directory /proc/moe_bench_out is not writable",
        ),
    ],
)
@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_wrong_input_gets_one_clear_message(tmp_path: Path, args, code, message) -> None:
    proc = run_cli([*args, "model=tiny", f"hydra.run.dir={tmp_path / 'out'}"][::-1], tmp_path)
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
