"""A job's life on disk (docs/contract.md §7): states, resume keyed by config, locks, bad rows,
unwritable folders, allocation failures: one section per kind of trouble a job meets."""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from omegaconf import DictConfig, OmegaConf

from moe_bench import locks, results, runner
from moe_bench import rows as parts
from moe_bench.callbacks import check_same_sweep
from moe_bench.recorder import Recorder
from moe_bench.report.__main__ import main as report_main
from moe_bench.report.load import job_table
from moe_bench.report.render import build_report

from . import report_fixtures as fx
from .conftest import FAST, cli_env, run_cli

JOB = ["variant=switch", "task=memory", *FAST, "task.warmup=0", "task.repeats=1"]


@pytest.fixture(scope="module")
def composed() -> dict[tuple[str, ...], DictConfig]:
    """JOB's configs composed in this module, by extra overrides."""
    return {}


@pytest.fixture
def job_cfg(
    compose_cfg: Callable[..., DictConfig], composed: dict[tuple[str, ...], DictConfig]
) -> Callable[..., DictConfig]:
    """JOB with `extra` overrides, each composed once per module (the same overrides compose
    the same config; a compose costs a tenth of a second), a copy to each caller."""

    def make(*extra: str) -> DictConfig:
        if extra not in composed:
            composed[extra] = compose_cfg(*JOB, *extra)
        return copy.deepcopy(composed[extra])

    return make


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def dead_pid() -> int:
    """The PID of a process that has exited (a killed job's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- a killed job is incomplete, a never started one is counted -------------------------------


def killed_job(folder: Path) -> None:
    """What a job killed mid-way leaves: flushed rows, a running state file, a dead PID."""
    recorder = Recorder(folder, fx.base("switch", "convergence"))
    for step in range(40):
        recorder.log("val_loss", 3.0 - step / 100, step=step)
    recorder.flush()
    results.write_state(folder, "running", results.config_key(recorder.base))
    record = json.loads((folder / results.STATE).read_text())
    (folder / results.STATE).write_text(json.dumps({**record, "pid": dead_pid()}))


def test_killed_job_is_incomplete_and_kept_out_of_the_leaderboard(
    tmp_path: Path, no_figures: None
) -> None:
    jobs = [fx.convergence_job("dense"), fx.convergence_job("gshard")]
    sweep = fx.write_sweep(tmp_path, jobs, ["variant=dense,gshard,switch,mixtral"])
    killed_job(tmp_path / "2")  # job 3 (mixtral) never started: no folder at all
    assert results.job_state(tmp_path / "2") == "incomplete"
    assert results.job_state(tmp_path / "3") is None
    states = {j.job: j.state for j in job_table(sweep, results.load(sweep), [])}
    assert states == {"0": "ok", "1": "ok", "2": "incomplete", "3": "not started"}
    html = build_report(sweep).read_text()
    assert "<li>4 jobs</li>" in html and "<li>2 ok</li>" in html
    assert "1 incomplete" in html and "1 not started" in html
    board = html[html.index('<section id="leaderboards">') :]
    assert not re.search(r">\s*switch\s*</td>", board)  # its step-39 loss is no final value
    assert "variant=mixtral" in html  # the never-started job, by its overrides


PAUSE_PRELUDE = """
import dataclasses, time
from moe_bench import registry
real_run = registry.TASKS['memory'].run
def run(job, recorder):
    real_run(job, recorder)
    recorder.flush()
    print("FLUSHED", flush=True)
    time.sleep(60)
registry.TASKS['memory'] = dataclasses.replace(registry.TASKS['memory'], run=run)
"""


def start_cli(args: list[str], cwd: Path, prelude: str) -> subprocess.Popen:
    code = (
        f"import runpy, sys\n{prelude}\nsys.argv = ['moe_bench', *{args!r}]\n"
        "runpy.run_module('moe_bench', run_name='__main__', alter_sys=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, text=True
    )


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_sigkill_leaves_an_incomplete_job_that_resume_reruns(tmp_path: Path) -> None:
    out = tmp_path / "job"
    args = [*JOB, f"hydra.run.dir={out}"]
    proc = start_cli(args, tmp_path, PAUSE_PRELUDE)
    try:
        assert proc.stdout is not None
        while "FLUSHED" not in proc.stdout.readline():
            assert proc.poll() is None, "the job ended before it was killed"
        assert results.job_state(out) == "running"  # its lock is held
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert results.job_state(out) == "incomplete"
    assert {r["status"] for r in results.read_rows(out)[0]} == {"running"}
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr
    rows, problems = results.read_rows(out)
    assert problems == [] and results.job_state(out) == "ok"
    assert [r["metric"] for r in rows].count("job") == 1 and {r["status"] for r in rows} == {"ok"}


# --- resume is keyed by the resolved config ---------------------------------------------------


def test_resume_refuses_a_folder_of_another_config(job_cfg, tmp_path: Path, capsys) -> None:
    assert runner.execute(job_cfg(), tmp_path, "first") == "ok"
    before = [p.read_bytes() for p in parts.part_files(tmp_path)]
    assert runner.execute(job_cfg(), tmp_path, "same") == "skipped"
    capsys.readouterr()
    assert runner.execute(job_cfg("seed=1"), tmp_path, "seed1") == "refused"
    err = capsys.readouterr().err
    assert len(lines(err)) == 1
    assert "seed: 0 -> 1" in err and "hydra.sweep.dir" in err and "overwrite=true" in err
    assert [p.read_bytes() for p in parts.part_files(tmp_path)] == before  # untouched
    assert runner.execute(job_cfg("seed=1", "overwrite=true"), tmp_path, "over") == "ok"
    rows = results.read_rows(tmp_path)[0]
    assert {r["seed"] for r in rows} == {1} and results.read_state(tmp_path)["config"]["seed"] == 1


def sweep_config(sweep: Path, *overrides: str, overwrite: bool = False) -> DictConfig:
    return OmegaConf.create(
        {
            "overwrite": overwrite,
            "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": list(overrides)}},
        }
    )


def test_a_sweep_folder_run_with_other_overrides_is_refused_first(tmp_path: Path, capsys) -> None:
    OmegaConf.save(sweep_config(tmp_path, "variant=a,b", "seed=0"), tmp_path / "multirun.yaml")
    check_same_sweep(sweep_config(tmp_path, "seed=0", "variant=a,b", "hydra.verbose=true"))
    with pytest.raises(SystemExit) as info:
        check_same_sweep(sweep_config(tmp_path, "variant=a,b", "seed=1", "+x=2"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(lines(err)) == 1 and "seed: 0 -> 1, x: (absent) -> 2" in err
    check_same_sweep(sweep_config(tmp_path, "variant=a,b", "seed=1", overwrite=True))


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_cli_resume_with_another_seed_is_refused_before_hydra_rewrites(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *JOB, f"hydra.sweep.dir={sweep}", "~hydra.callbacks.report"]
    assert run_cli(args, tmp_path).returncode == 0
    saved = {p: p.read_bytes() for p in (sweep / "multirun.yaml", sweep / "0/.hydra/config.yaml")}
    again = run_cli([*args, "seed=1"], tmp_path)
    assert again.returncode == 2
    assert lines(again.stderr) == [
        f"moe_bench: error: sweep folder {sweep} was run with other overrides (seed: (absent) "
        "-> 1); use another hydra.sweep.dir, or overwrite=true to replace the jobs whose config "
        "changed"
    ]
    single = run_cli([*JOB, "seed=1", f"hydra.run.dir={sweep / '0'}"], tmp_path)
    assert single.returncode == 1 and len(lines(single.stderr)) == 1
    assert "holds results of another config (seed: 0 -> 1)" in single.stderr
    assert {p: p.read_bytes() for p in saved} == saved  # the records still say seed 0


def test_a_code_change_keeps_ok_rows_and_says_so(job_cfg, tmp_path: Path, capsys) -> None:
    assert runner.execute(job_cfg(), tmp_path, "first") == "ok"
    state = results.read_state(tmp_path)
    (tmp_path / results.STATE).write_text(json.dumps({**state, "git_commit": "0123456789ab"}))
    capsys.readouterr()
    assert runner.execute(job_cfg(), tmp_path, "later") == "skipped"
    assert "measured at commit 0123456789, now" in capsys.readouterr().out


# --- bad rows are named, that job is unreadable, the report goes on ---------------------------


def missing(column: str) -> pytest.param:
    """A row without `column`: the default run checks one required column (status), the slow
    run the others (the same check, each a report build)."""
    marks = () if column == "status" else pytest.mark.slow
    return pytest.param(lambda r: r.pop(column), f"missing required column {column}", marks=marks)


@pytest.mark.parametrize(
    ("edit", "what"),
    [
        missing("status"),
        missing("task"),
        missing("metric"),
        missing("value"),
        (lambda r: r.update(value="1.5"), "value='1.5' is not a number"),
        (lambda r: r.update(status="done"), "unknown status='done'"),
        missing("variant"),
    ],
)
def test_a_bad_row_is_named_and_its_job_shown_unreadable(
    tmp_path: Path, edit, what, no_figures: None
) -> None:
    jobs = [fx.memory_job(v) for v in ("dense", "switch", "gshard")]
    for row in jobs[1]:
        edit(row)
    sweep = fx.write_sweep(tmp_path, jobs, ["variant=dense,switch,gshard"])
    problems: list[str] = []
    frame = results.load(sweep, problems)
    assert sorted(frame.job_dir.unique()) == ["0", "2"]
    assert problems[0].startswith(f"{sweep / '1' / results.RESULTS}:1: {what}")
    html = build_report(sweep).read_text()
    assert "1 unreadable" in html and what.replace("'", "&#39;") in html
    assert re.search(r">\s*gshard\s*</td>", html[html.index('<section id="leaderboards">') :])


def test_rows_without_step_anywhere_still_make_a_report(
    tmp_path: Path, sketched_figures: None
) -> None:
    jobs = [fx.convergence_job(v) for v in ("dense", "switch")]
    for job in jobs:
        for row in job:
            row.pop("step")
    html = build_report(fx.write_sweep(tmp_path, jobs)).read_text()
    assert "<li>2 ok</li>" in html


# --- a deleted env.json -----------------------------------------------------------------------


def test_deleted_env_json_keeps_the_card_then_is_rebuilt_on_resume(
    job_cfg, tmp_path: Path, no_figures: None
) -> None:
    job = tmp_path / "0"
    OmegaConf.save(
        OmegaConf.create({"hydra": {"overrides": {"task": []}}}), tmp_path / "multirun.yaml"
    )
    assert runner.execute(job_cfg(), job, "first") == "ok"
    (job / results.ENV).unlink()
    page = build_report(tmp_path).read_text()
    # the run card on the job row still says where it ran: nothing to flag
    assert "env.json missing" not in page and "no run card" not in page
    assert platform.python_version() in page
    assert runner.execute(job_cfg(), job, "resume") == "skipped"
    env = json.loads((job / results.ENV).read_text())
    assert env["rebuilt"].startswith("on resume") and env["torch"]


# --- one writer per job and per sweep folder --------------------------------------------------


HOLDER = """
import sys, time
from moe_bench import locks
lock = locks.Lock(sys.argv[1]).acquire()
print("HELD", flush=True)
time.sleep(60)
"""


@pytest.fixture
def hold() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """hold(folder): another process that holds folder's lock until the test ends."""
    procs = []

    def _hold(folder: Path) -> subprocess.Popen:
        command = [sys.executable, "-c", HOLDER, str(folder)]
        proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HELD"
        return proc

    yield _hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_held_job_folder_is_left_alone(job_cfg, tmp_path: Path, hold, capsys) -> None:
    assert runner.execute(job_cfg(), tmp_path, "first") == "ok"
    (tmp_path / results.RESULTS).write_text("")  # as if the holder were re-running it
    other = hold(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert results.job_state(tmp_path) == "running"
    capsys.readouterr()
    assert runner.execute(job_cfg(), tmp_path, "second") == "busy"
    err = capsys.readouterr().err
    assert len(lines(err)) == 1 and f"in use by PID {other.pid} on host " in err and "since" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_helper_rank_writes_apart_and_leaves_the_folder_to_rank_0(
    job_cfg, tmp_path: Path, hold, monkeypatch
) -> None:
    """An env launcher starts every rank of one job in one folder (task=expert_parallel):
    ranks > 0 neither lock nor take over rank 0's files."""
    hold(tmp_path)  # rank 0, running
    monkeypatch.setenv("RANK", "1")
    assert runner.execute(job_cfg(), tmp_path, "rank1") == "ok"
    assert not results.has_rows(tmp_path) and not (tmp_path / results.STATE).exists()
    last = sorted(tmp_path.glob("rows.rank1-*.parquet"))[-1]
    table = pq.read_table(last).to_pylist()
    assert table[-1]["metric"] == "job" and table[-1]["status"] == "ok"


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_a_second_multirun_on_a_held_sweep_folder_exits(tmp_path: Path, hold) -> None:
    sweep = tmp_path / "sweep"
    other = hold(sweep)
    proc = run_cli(["-m", *JOB, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 2
    assert lines(proc.stderr) == [
        f"moe_bench: error: sweep folder {sweep} is in use by PID {other.pid} on host "
        f"{os.uname().nodename} since {json.loads((sweep / locks.LOCK).read_text())['since']}; "
        "wait for it, or use another hydra.sweep.dir"
    ]
    assert sorted(p.name for p in sweep.iterdir()) == [locks.LOCK]  # no job, no multirun.yaml


# --- a cut line -------------------------------------------------------------------------------


def test_a_cut_part_is_rerun_by_resume_and_named_by_the_report(
    job_cfg, tmp_path: Path, capsys, no_figures: None
) -> None:
    job = tmp_path / "0"
    OmegaConf.save(
        OmegaConf.create({"hydra": {"overrides": {"task": []}}}), tmp_path / "multirun.yaml"
    )
    assert runner.execute(job_cfg(), job, "first") == "ok"
    path = parts.part_files(job)[-1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut in half (by hand: writes are atomic)
    capsys.readouterr()
    assert report_main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}: not a readable Parquet part" in err
    assert results.job_state(job) == "incomplete"
    assert runner.execute(job_cfg(), job, "resume") == "ok"  # re-run, not a crash
    rows, problems = results.read_rows(job)
    assert problems == [] and rows[-1]["metric"] == "job" and rows[-1]["status"] == "ok"


# --- an allocation failure, then a read-only job folder, in one sweep -------------------------

ALLOC_PRELUDE = """
import dataclasses, torch
from moe_bench import registry
real_run = registry.TASKS['memory'].run
def run(job, recorder):
    if job.variant == "dense":
        torch.empty(2**45 // 4)  # 32 TiB: torch's CPU allocator raises a RuntimeError
    real_run(job, recorder)
registry.TASKS['memory'] = dataclasses.replace(registry.TASKS['memory'], run=run)
"""


def read_only(folder: Path) -> Callable[[], None]:
    """Make folder unwritable (chattr +i as root, whom chmod does not stop); returns undo."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("root without chattr: cannot make a folder read-only")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_allocation_failure_then_read_only_job_folder(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "variant=dense,switch", *JOB[1:], f"hydra.sweep.dir={sweep}"]
    args.append("~hydra.callbacks.report")
    first = run_cli(args, tmp_path, prelude=ALLOC_PRELUDE)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stdout + first.stderr
    failed = [line for line in lines(first.stderr) if line.startswith("failed ")]
    assert len(failed) == 1 and "can't allocate memory" in failed[0]
    log = next((sweep / "0").glob("*.log")).read_text()
    assert "Traceback" in log and "can't allocate memory" in log  # kept for whoever digs
    assert results.job_state(sweep / "0") == "failed"

    undo = read_only(sweep / "0")
    try:
        second = run_cli(args, tmp_path)  # resume: job 0 failed, so it is run again
    finally:
        undo()
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    failed = [line for line in lines(second.stderr) if line.startswith("failed ")]
    assert len(failed) == 1 and f"cannot write in {sweep / '0'}" in failed[0]
    assert "skipped " in second.stdout  # job 1: the sweep went on
    assert results.job_state(sweep / "0") == "failed"  # its rows left as they were
