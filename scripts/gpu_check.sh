#!/usr/bin/env bash
# GPU verification of the CUDA path, in one run (a lent H100/H200, or any CUDA machine).
#
#   OUT=gpu_out bash scripts/gpu_check.sh
#
# Run from the repository root on a machine whose python3 already has a CUDA build of torch.
# Machines without network: put the wheels and sdists it needs in .whl/ first (on a machine
# with network, see `prepare` below: `bash scripts/gpu_check.sh prepare`), then carry .whl/.
#
# What it does, every step logged under $OUT (one file per step; sweeps tarred):
#   1. versions (torch, CUDA, GPU, driver);
#   2. installs the project's Python dependencies that are missing (from .whl/ when present);
#   3. builds megablocks 0.10.0 + grouped_gemm 0.3.0 + stanford-stk 0.7.1 against the torch
#      already installed (--no-deps --no-build-isolation), in the background; a failed build is
#      recorded (megablocks_build.log) and the rest goes on without megablocks;
#   4. meanwhile `+experiment=quick device=cuda` with its report (quick.tar.gz);
#   5. `pytest -q -m gpu` (pytest_gpu.log);
#   6. the throughput + memory sweep: variant=mixtral,deepseek_moe,deepseek_v3,dense,
#      megablocks_dmoe x backend=grouped,megablocks, bf16, T=16384, D=2048, at a Mixtral-like
#      (model.expansion=8: 8 coarse experts) and a DeepSeekMoE-like (expansion 16) size, with its
#      report (throughput.tar.gz) and a tokens/s summary (throughput_summary.txt);
#   7. a torch.profiler table of one forward+backward of deepseek_moe on `grouped` (profile.txt).
# Each step has a time limit (seconds, below) so that one stuck step cannot eat the others.
# STEPS="3 5 6" runs only those steps (1 and 2 always run): a second try redoes what failed.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}
if [ "${1:-}" = "prepare" ]; then
  # On a machine with network: everything the GPU machine may lack, for CPython 3.12.
  mkdir -p "$WHEELS"
  python3 -m pip download --no-deps -d "$WHEELS" hydra-core==1.3.2 omegaconf==2.3.0
  python3 -m pip wheel --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
  # sdists only (they build against the GPU machine's torch); pip download would try to build
  for pkg in megablocks==0.10.0 stanford-stk==0.7.1 grouped_gemm==0.3.0; do
    python3 -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$WHEELS" "$pkg" \
      || echo "download $pkg by hand from PyPI's simple index into $WHEELS"
  done
  exit 0
fi

OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
RUNS=${RUNS:-/tmp/moe_bench_gpu}
SITE=${SITE:-/tmp/moe_bench_site}
rm -rf "$RUNS" && mkdir -p "$RUNS" "$SITE"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/gpu_check.log") 2>&1
stamp() { echo "== $(date +%T) $*"; }
STEPS=${STEPS:-3 4 5 6 7}
want() { [[ " $STEPS " == *" $1 "* ]]; }

stamp "1. versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(), 'cc', torch.cuda.get_device_capability())"

stamp "2. project dependencies"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
fi
python3 -c "import hydra, omegaconf, pandas, seaborn, jinja2, tqdm, pytest_benchmark, variants, moe_bench
print('imports ok; variants', variants.names())" || { echo "missing dependencies: stop"; exit 1; }

BUILD_PID=
want 3 && stamp "3. megablocks build (background)" && (
  export MAX_JOBS=${MAX_JOBS:-12} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  # CUDA 13's CUB dropped DeviceScan's `debug_synchronous` argument, which megablocks 0.10.0's
  # csrc/cumsum.h still passes (6 compile errors): build from a copy with that argument removed.
  src=/tmp/megablocks_src && rm -rf "$src" && mkdir -p "$src"
  if [ -f "$WHEELS/megablocks-0.10.0.tar.gz" ]; then
    tar xzf "$WHEELS/megablocks-0.10.0.tar.gz" -C "$src"
  else
    python3 -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$src" \
      megablocks==0.10.0 && tar xzf "$src"/megablocks-0.10.0.tar.gz -C "$src"
  fi
  sed -i -e 's/^\(\s*\)stream,$/\1stream));/' -e '/^\s*debug_synchronous));$/d' \
    "$src/megablocks-0.10.0/csrc/cumsum.h"
  mb_src=()
  for pkg in stanford_stk-0.7.1 grouped_gemm-0.3.0; do
    if [ -f "$WHEELS/$pkg.tar.gz" ]; then mb_src+=("$WHEELS/$pkg.tar.gz"); fi
  done
  if [ ${#mb_src[@]} -ne 2 ]; then mb_src=(stanford-stk==0.7.1 grouped_gemm==0.3.0); fi
  mb_src+=("$src/megablocks-0.10.0")
  time timeout 420 python3 -m pip install --no-deps --no-build-isolation \
    --target "$SITE" "${mb_src[@]}" && echo BUILD_OK
) > "$OUT/megablocks_build.log" 2>&1 &
want 3 && BUILD_PID=$!

if want 4; then
  stamp "4. quick sweep on cuda"
  timeout 420 python3 -m moe_bench +experiment=quick device=cuda \
    hydra.sweep.dir="$RUNS/quick" > "$OUT/quick.log" 2>&1
  echo "quick sweep exit $?"; tail -n 5 "$OUT/quick.log"
  tar czf "$OUT/quick.tar.gz" -C "$RUNS" quick
fi

if [ -n "$BUILD_PID" ]; then
  stamp "waiting for the megablocks build"
  wait "$BUILD_PID"
  tail -n 3 "$OUT/megablocks_build.log"
fi
python3 -c "import megablocks, grouped_gemm; print('megablocks', megablocks.__version__)" \
  || echo "megablocks unavailable: its rows and tests record why"

if want 5; then
  stamp "5. pytest -m gpu"
  # -o addopts=: the image may lack pytest-xdist (the project's addopts say -n auto)
  timeout 300 python3 -m pytest -q -o addopts= -m gpu --benchmark-disable -rs -p no:cacheprovider tests > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest exit $?"; tail -n 15 "$OUT/pytest_gpu.log"
fi

want 6 && {
stamp "6. throughput + memory sweep, bf16, T=16384, D=2048"
timeout 600 python3 -m moe_bench -m task=throughput,memory \
  variant=mixtral,deepseek_moe,deepseek_v3,dense,megablocks_dmoe backend=grouped,megablocks \
  model=large model.tokens=16384 model.expansion=8,16 dtype=bfloat16 device=cuda \
  task.warmup=10 task.repeats=30 hydra.sweep.dir="$RUNS/throughput" \
  > "$OUT/throughput.log" 2>&1
echo "throughput sweep exit $?"
tar czf "$OUT/throughput.tar.gz" -C "$RUNS" throughput
grep -E "^(ok|failed|skipped)" "$OUT/throughput.log" | cut -c1-200
python3 - "$RUNS/throughput" > "$OUT/throughput_summary.txt" 2>&1 <<'EOF'
import sys
import pandas as pd
from moe_bench import results
df = results.load(sys.argv[1])
ok = df[(df.status == "ok") & (df.task == "throughput")]
keys = ["model.expansion", "variant", "backend", "variant.num_experts", "variant.top_k",
        "variant.expert_hidden", "pass"]
tok = ok[ok.metric == "tokens_per_s"].set_index(keys).value.rename("tok_s")
ratio = ok[ok.metric == "ratio_to_dense"].set_index(keys)
table = pd.concat([tok, ratio.value.rename("ratio_to_dense"), ratio.dense_ms], axis=1)
table["dense_fraction"] = 1 / table.ratio_to_dense
with pd.option_context("display.width", 200, "display.max_rows", 200):
    print(table.round(3).sort_index().to_string())
    print(df[df.status == "failed"].drop_duplicates(["variant", "backend", "model.expansion"])[
        ["variant", "backend", "model.expansion", "task", "error"]].to_string())
EOF
cat "$OUT/throughput_summary.txt"
}

want 7 && {
stamp "7. profile: deepseek_moe on grouped, bf16, T=16384, D=2048, fwd+bwd"
timeout 120 python3 - > "$OUT/profile.txt" 2>&1 <<'EOF'
import torch
from torch.profiler import ProfilerActivity, profile
import variants
with torch.device("cuda"):
    layer = variants.build("deepseek_moe", d_model=2048, num_experts=63, expert_hidden=2048,
                           top_k=7, num_shared_experts=1, backend="grouped").to(torch.bfloat16)
x = torch.randn(4, 4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def step():
    out = layer(x)
    (out.y.float().square().mean() + out.aux_loss).backward()
for _ in range(5):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
EOF
head -n 40 "$OUT/profile.txt"
}

ls -la "$OUT"
stamp "done"
