"""The real launchers on CPU (slow run): `task=expert_parallel` as two processes started by
torchrun (`task.launcher=env`), and a two-job sweep through Hydra's `submitit_local` launcher.

Each is checked against the same config run in this process without the launcher: the
launcher changes how processes start, never an untimed number. Every process has a deadline
(its process group is killed past it), so nothing hangs CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import moe_bench
from moe_bench import results
from moe_bench import rows as parts
from moe_bench.__main__ import execute
from tests.moe_bench.conftest import FAST, cli_env

# deepseek_v2 top-3 of 8 over 2 ranks, M=1: model=tiny is 4 sequences of 64, 2 per rank
EP = [
    "task=expert_parallel", "task.ep_size=2", "task.warmup=0", "task.repeats=1",
    "task.steps=3", "task.timeout_s=120", "variant=deepseek_v2", "variant.num_experts=8",
    "variant.expert_hidden=16", "variant.top_k=3", "variant.num_shared_experts=1",
    "variant.num_devices=2", "variant.max_devices=1", "variant.capacity_factor=null",
]  # fmt: skip
# what the traffic forward and the training run give: exact, whatever starts the ranks
UNTIMED = ["devices_per_token", "bytes_per_token", "remote_fraction", "rank_imbalance",
           "rank_tokens"]  # fmt: skip
UNTIMED_COLUMNS = [
    "metric", "layer", "phase", "step", "src", "dst", "value", "devices_per_token_max",
    "dispatch_bytes", "combine_bytes", "assignments",
]  # fmt: skip


def run_group(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`command` in its own process group, all of it killed past `timeout` seconds (torchrun's
    and submitit's workers are grandchildren: killing the child alone would leave them)."""
    with subprocess.Popen(
        command, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{command[:6]} ran past {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def untimed(frame: pd.DataFrame) -> pd.DataFrame:
    rows = frame[frame.metric.isin(UNTIMED)]
    rows = rows[[c for c in UNTIMED_COLUMNS if c in rows]].astype(str)
    return rows.sort_values(list(rows.columns)).reset_index(drop=True)


@pytest.mark.slow  # several processes: the slow run
def test_torchrun_two_ranks_write_the_spawned_jobs_untimed_values(tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "moe_bench", *FAST, *EP, "task.launcher=env", f"hydra.run.dir={out}",
    ]  # fmt: skip
    done = run_group(command, tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    frame = results.load(out)
    assert set(frame.status) == {"ok"} and (frame["task.launcher"] == "env").all()
    # rank 1 writes only its own closing row, beside rank 0's rows
    tables, problems = parts.read_tables_of(sorted(out.glob("rows.rank1-*.parquet")))
    assert tables and problems == []
    helper = parts.frame(tables)
    assert helper.metric.tolist() == ["job"] and helper.status.tolist() == ["ok"]
    matrix = frame[frame.metric == "rank_tokens"]
    assert sorted(zip(matrix.src, matrix.dst)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert matrix.assignments.sum() == 256 * 3  # every token's K=3 assignments, dropless
    train = frame[(frame.metric == "rank_imbalance") & (frame.phase == "train")]
    assert sorted(train.step) == [0, 1, 2]

    spawned = tmp_path / "spawn"
    cfg = moe_bench.compose(*FAST, *EP, "task.launcher=spawn")
    assert execute(cfg, spawned, "spawn") == "ok"
    want = untimed(results.load(spawned))
    assert len(want) == 2 * 4 + 4 + 3  # layer 0 and mean, the 2x2 matrix, 3 training steps
    pd.testing.assert_frame_equal(untimed(frame), want)


@pytest.mark.slow  # a subprocess sweep: the slow run
def test_submitit_local_sweep_runs_two_jobs(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # the `launchers` extra
    sweep = tmp_path / "sweep"
    job = [*FAST, "task=balance"]
    command = [
        sys.executable, "-m", "moe_bench", "-m", "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=4", *job, "variant=switch,gshard",
        f"hydra.sweep.dir={sweep}", "~hydra.callbacks.report",
    ]  # fmt: skip
    done = run_group(command, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    frame = results.load(sweep)
    jobs = frame[frame.metric == "job"]
    assert sorted(jobs.variant) == ["gshard", "switch"] and set(jobs.status) == {"ok"}
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit ran them
    for variant, rows in frame.groupby("variant"):
        here = tmp_path / f"here_{variant}"
        assert execute(moe_bench.compose(*job, f"variant={variant}"), here, variant) == "ok"
        want = results.load(here)
        keep = ["metric", "layer", "domain", "expert", "step", "value"]
        got, want = (
            f[f.metric != "job"][[c for c in keep if c in f]].astype(str).reset_index(drop=True)
            for f in (rows, want)
        )
        assert len(got) > 10
        pd.testing.assert_frame_equal(got, want)
