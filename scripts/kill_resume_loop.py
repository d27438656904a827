"""Kill -9 a 6-job sweep at a random moment, resume it, check the result; N times.

    python scripts/kill_resume_loop.py [--rounds 10] [--seed 0] [--steps 30] [--work DIR]

First an uninterrupted run of the sweep (the reference). Then, per round: a fresh sweep folder,
the same command started and SIGKILLed (its whole process group) after a random delay drawn
uniformly over the reference's job span (from its first job's start to its last job's end), then
the same command again (the resume) to its end.
Each round passes when the resumed sweep has exactly one set of rows per job (one closing `job`
row per job folder, 6 folders), every job and row `ok`, no unreadable line, and the same metric
values as the reference, timings aside (time and throughput metrics, `wall_s`, the `job` row's
seconds). Prints one line per round and a summary; exit 0 when every round passed.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_bench import results  # noqa: E402  (this checkout's, not an installed one)

# six short convergence jobs: training rows are flushed during the run, so a kill mid-job
# leaves rows without a closing `job` row, the case resume must get right
SWEEP = [
    "-m", "variant=switch,gshard,mixtral", "seed=0,1", "task=convergence", "model=tiny",
    "device=cpu", "device.threads=1", "task.eval_every=10",
    "task.eval_batches=2", "task.batch_size=4", "task.seq_len=32", "task.n_layers=1",
    "task.warmup_steps=2",
]  # fmt: skip
TIMINGS = {"fwd_ms", "fwd_bwd_ms", "tokens_per_s", "tflops", "ratio_to_dense", "job"}
UNTIMED_COLUMNS = ("wall_s", "iqr_ms", "min_ms", "max_ms", "noisy", "load_avg")


STEPS = 30  # training steps per job (--steps): more steps, more kills land mid-training


def command(sweep: Path) -> list[str]:
    sweep_args = [*SWEEP, f"task.steps={STEPS}", f"hydra.sweep.dir={sweep}"]
    return [sys.executable, "-m", "moe_bench", *sweep_args]


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run(sweep: Path, kill_after: float | None = None) -> float:
    """Run the sweep to its end, or SIGKILL it `kill_after` seconds after its first job
    started (its folder appeared: the moments before are Python's start-up, nothing to test);
    returns the seconds from the first job's start to the last job's end."""
    proc = subprocess.Popen(
        command(sweep), cwd=ROOT, env=environment(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not (sweep / "0").is_dir() and proc.poll() is None:
        time.sleep(0.02)
    first = time.time()
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and anything it started
        proc.wait()
        return time.time() - first
    if proc.returncode:
        raise SystemExit(f"sweep {sweep} exited {proc.returncode}: {err[-2000:]}")
    ends = [p.stat().st_mtime for p in sweep.glob(f"*/{results.STATE}")]
    return max(ends, default=first) - first


def values(sweep: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Per job folder, its untimed rows as sorted tuples (metric, keys..., value)."""
    problems: list[str] = []
    frame = results.load(sweep, problems)
    if problems:
        raise AssertionError(f"unreadable rows: {problems}")
    frame = frame[~frame["metric"].isin(TIMINGS)]
    frame = frame.drop(columns=[c for c in UNTIMED_COLUMNS if c in frame.columns])
    out = {}
    for job, rows in frame.groupby("job_dir"):
        cells = rows.drop(columns=["job_dir"]).astype(object).where(rows.notna(), None)
        names = list(cells.columns)
        out[str(job)] = sorted(
            (tuple(zip(names, map(_plain, row))) for row in cells.itertuples(index=False)),
            key=repr,
        )
    return out


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def check(sweep: Path, reference: dict[str, list[tuple[Any, ...]]]) -> str:
    """'' when the resumed sweep matches the reference, else what differs."""
    folders = sorted(p.parent.name for p in sweep.glob("*/.hydra"))
    states = {f: results.job_state(sweep / f) for f in folders}
    frame = results.load(sweep)
    closing = frame[frame["metric"] == "job"].groupby("job_dir").size().to_dict()
    if len(folders) != 6 or set(states.values()) != {"ok"}:
        return f"job states {states}"
    if closing != {f: 1 for f in folders}:
        return f"closing job rows per folder {closing}"
    if set(frame["status"]) != {"ok"}:
        return f"row statuses {set(frame['status'])}"
    got = values(sweep)
    differ = [job for job in reference if got.get(job) != reference[job]]
    return f"values differ from the reference in jobs {differ}" if differ else ""


def main() -> int:
    global STEPS  # set once from --steps, read by command()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per job")
    parser.add_argument("--work", type=Path, default=None, help="folder for the sweeps")
    args = parser.parse_args()
    STEPS = args.steps
    work = args.work or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    draw = random.Random(args.seed)
    wall = run(work / "reference")
    reference = values(work / "reference")
    print(f"reference: {len(reference)} jobs, {sum(map(len, reference.values()))} untimed rows, "
          f"jobs over {wall:.1f} s ({work / 'reference'})")  # fmt: skip
    passed = 0
    for n in range(1, args.rounds + 1):
        sweep = work / f"round{n}"
        delay = draw.uniform(0.0, wall)
        run(sweep, kill_after=delay)
        before = {
            f: results.job_state(sweep / f)
            for f in sorted(p.parent.name for p in sweep.glob("*/.hydra"))
        }
        run(sweep)  # the resume
        problem = check(sweep, reference)
        passed += not problem
        killed = ", ".join(f"{f}:{s}" for f, s in before.items()) or "nothing started"
        print(f"round {n}: killed {delay:.1f} s into the jobs ({killed}) -> "
              f"{'ok' if not problem else 'FAILED: ' + problem}", flush=True)  # fmt: skip
    print(f"{passed}/{args.rounds} rounds passed")
    return 0 if passed == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
