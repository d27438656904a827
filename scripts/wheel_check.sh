#!/usr/bin/env bash
# The installed package, away from the clone: build the wheel of this working tree, install it
# (with the CPU torch) into a fresh virtual environment, and from a folder outside the clone run
# one job with the `moe-bench` console script; check that its configs came from inside the
# installed package and that it wrote an ok `job` row. Run by .ci/run; a minute or two, most of it
# pip installing torch and the dependencies.
#
#     scripts/wheel_check.sh [PYTHON]      # PYTHON: makes the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# build from a copy of the working tree (tracked and untracked, not ignored files), so the
# build's own folders (build/, *.egg-info) stay out of the clone
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
"$PYTHON" -m venv "$WORK/venv"
VENV="$WORK/venv/bin"
"$VENV/python" -m pip wheel -q --no-deps -w "$WORK/wheel" "$WORK/src"
# the CPU wheel of torch pinned in the same install (a bare `torch` would pull a CUDA build);
# --no-compile: byte-compiling torch's and pandas' sources would take most of the time
"$VENV/python" -m pip install -q --no-compile torch==2.13.0 "$WORK"/wheel/moe_bench-*.whl

mkdir "$WORK/run"
cd "$WORK/run"
"$VENV/python" - <<'PY'
import sys
from pathlib import Path

import moe_bench

where = moe_bench.config_dir()
if Path(sys.prefix) not in where.parents or not (where / "config.yaml").is_file():
    sys.exit(f"configs at {where}, not inside the installed package under {sys.prefix}")
PY
"$VENV/moe-bench" +experiment=quick --cfg job >/dev/null
"$VENV/moe-bench" task=balance variant=switch model=tiny device=cpu hydra.run.dir="$WORK/run/job"
"$VENV/python" - "$WORK/run/job" <<'PY'
import sys

from moe_bench import results

rows, problems = results.read_rows(sys.argv[1])
if problems:
    sys.exit(f"{sys.argv[1]}: {problems[0]}")
jobs = [row for row in rows if row["metric"] == "job"]
if len(jobs) != 1 or jobs[0]["status"] != "ok":
    sys.exit(f"{sys.argv[1]}: expected one ok job row, got {jobs}")
print(f"wheel check: the installed moe-bench wrote {len(rows)} rows, job ok")
PY
