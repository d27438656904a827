"""The speed table (README, "Performance on CPU"): our `grouped` backend and HF transformers'
MoE against dense.

    python scripts/speed_table.py                          # every size and layer
    python scripts/speed_table.py --size quick --profile   # one size, plus the profiles

Forward+backward, fp32, 2 threads, SwiGLU experts. Each layer of each size is timed against
dense in a fresh Python process (a process's history moves its timings: tests/benchmarks/
gated.py says by how much), interleaved round by round (`moe_bench.timing.time_pair`: A B,
then B A, ...); a cell is the median of the per-round ratios to dense, its 95% CI half-width
(distribution-free, `moe_bench.timing.median_ci_halfwidth`) and the layer's median step time.
Dense is the SwiGLU FFN of the same active width (routed K*H plus shared). The HF columns need
transformers. `--profile` prints each layer's top ops (torch.profiler, self CPU time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import variants  # noqa: E402
from moe_bench.bench import hf_peer  # noqa: E402
from moe_bench.bench.cases import training_step  # noqa: E402
from moe_bench.isocompute import dense_reference  # noqa: E402
from moe_bench.timing import median_ci_halfwidth, time_pair  # noqa: E402

LAYERS = ("ours", "hf_grouped_mm", "hf_eager", "dense")
# name: (T, D, E, K, H, shared experts, our variant)
SIZES = {
    "quick": (2048, 128, 64, 8, 32, 1, "deepseek_moe"),
    "d256": (8192, 256, 64, 8, 64, 1, "deepseek_moe"),
    "fine": (4096, 512, 64, 8, 128, 1, "deepseek_moe"),
    "mixtral": (4096, 512, 8, 2, 1024, 0, "mixtral"),
}


def layers(size: str, names: tuple[str, ...] = LAYERS) -> dict[str, torch.nn.Module]:
    """The layers of one size named in `names` (each seeded alike)."""
    _, D, E, K, H, S, variant = SIZES[size]
    fields = dict(d_model=D, num_experts=E, top_k=K, expert_hidden=H, activation="swiglu")
    if S:
        fields["num_shared_experts"] = S
    out = {}
    for name in names:
        torch.manual_seed(0)
        if name == "dense":
            cfg = variants.make_config(variant, **fields)
            out[name] = variants.build("dense", **dense_reference(cfg))
        elif name == "ours":
            out[name] = variants.build(variant, backend="grouped", **fields).train()
        else:
            impl = name.removeprefix("hf_")
            out[name] = hf_peer.HFDeepseekV2MoE(D, E, H, K, S, impl)
    return out


def measure(size: str, name: str, rounds: int, profile: bool) -> tuple[float, float, float]:
    """(median ratio to dense, its CI half-width, median ms) of one layer of one size, timed
    interleaved with dense (A B, then B A, ...), in this process."""
    T, D = SIZES[size][:2]
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, D, generator=g).requires_grad_()
    grad_TD = torch.randn(T, D, generator=g)
    built = layers(size, (name, "dense"))
    step, dense = (training_step(built[n], x_TD, grad_TD) for n in (name, "dense"))
    pair = time_pair(step, dense, torch.device("cpu"), warmup=1, repeats=rounds, desc=name)
    if profile:
        from torch.profiler import profile as prof

        with prof() as p:
            for _ in range(5):
                step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    ratios = pair.ratio.samples_ms
    return pair.ratio.median_ms, median_ci_halfwidth(ratios), pair.a.median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES))
    parser.add_argument("--layer", choices=LAYERS[:-1])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.layer is not None:  # one measurement, printed as JSON for the parent
        print(json.dumps(measure(args.size, args.layer, args.rounds, args.profile)))
        return
    names = LAYERS[:-1] if hf_peer.available() is None else ("ours",)
    for size in [args.size] if args.size else list(SIZES):
        cells = []
        for name in names:  # each in a fresh process
            cmd = [sys.executable, __file__, "--size", size, "--layer", name]
            cmd += ["--rounds", str(args.rounds)] + (["--profile"] if args.profile else [])
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            if args.profile:
                print(done.stdout.rsplit("\n", 2)[0])
            ratio, halfwidth, ms = json.loads(done.stdout.strip().splitlines()[-1])
            cells.append(f"{ratio:.2f}x ±{halfwidth:.2f} ({ms:.1f} ms)")
        T, D, E, K, H, S, variant = SIZES[size]
        label = f"T={T} D={D} E={E} K={K} H={H}" + (f" +{S} shared" if S else "")
        print(f"| {label} ({variant}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
