"""Where a convergence training step spends its time, and tokens/s before and after the speed
options, for dense and two MoEs on the claims preset's model.

    python scripts/train_speed.py --rounds 5 --steps 3 --profile-steps 3 --compile

Model: the claims preset's (model=small, 4 layers, 16 windows of 128 bytes = 2048 tokens per
step, backend grouped, one thread), variants dense, switch dropless and deepseek_moe (m=4).
1. Profile, timed sections of whole steps (one arm after another): data (the next batch),
   forward+backward of the attention modules, of the FFN modules (the MoE layers; dense FFNs
   for dense; both without their pre-norms, which fall in "other"), of embedding + output
   head + loss, each replayed alone on the inputs the step's own forward gave it (hooks), with
   a fixed random output gradient; the optimizer
   (gradient clipping, AdamW, bias update); the per-step statistics (`TrainLog.add`); "other"
   is the whole measured step minus those parts (autograd and Python between them; a negative
   value means the replayed parts cost more alone than inside the step). Shares are of the
   whole step's median.
2. Tokens/s, interleaved: each round runs `--steps` steps of every (arm, option set) in turn,
   so load from other processes hits all alike; the row gives the median over rounds of
   tokens/s and of the per-round ratio after/before with its quartiles. Option sets: before =
   the default path (AdamW for-loop), after = `task.fused_optimizer=true`; with `--compile`
   also dense with `task.compile=true` (its compile time is reported, not counted). Also the
   ladder presets' model (model=ladder, width 64, fused), as a ratio to `after`: what the
   ladder's time estimates assume (sweeps/experiment/ladder.yaml).
The output records the machine, the load average before and after, and the settings.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_bench  # noqa: E402
from moe_bench import config, data  # noqa: E402
from moe_bench.tasks import convergence as C  # noqa: E402
from moe_bench.timing import quartiles  # noqa: E402

ARMS = ("dense", "switch_dropless", "deepseek_moe")  # options of sweeps/claims/
BASE = (
    "task=convergence", "model=small", "backend=grouped", "device=cpu", "device.threads=1",
    "task.steps=500", "task.warmup_steps=50",
)  # fmt: skip


class Trainer:
    """One arm's model, optimizer and batches at one option set; `step()` runs one step."""

    def __init__(self, arm: str, *overrides: str) -> None:
        self.job = config.resolve(moe_bench.compose(*BASE, f"+claims={arm}", *overrides))
        task = self.job.task
        corpus = data.load(self.job.data)
        self.batches = corpus.batches(
            "train", task.batch_size, task.seq_len, torch.Generator().manual_seed(0)
        )
        self.lm = C.build_model(self.job).train()
        self.model = torch.compile(self.lm) if task.compile else self.lm
        self.optimizer = C.make_optimizer(self.lm, task)
        self.log = C.TrainLog(lambda *a, **k: None, task.log_every, task.batch_size * task.seq_len)
        self.tokens = task.batch_size * task.seq_len

    def step(self) -> None:
        idx_BS, targets_BS, _ = next(self.batches)
        self.optimizer.zero_grad(set_to_none=True)
        out, _ = C.train_forward(self.model, idx_BS, targets_BS, len(idx_BS), C.nullcontext)
        torch.nn.utils.clip_grad_norm_(self.lm.parameters(), self.job.task.grad_clip)
        self.optimizer.step()
        self.lm.update_bias()
        self.log.add(out, 1.0)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def replay(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, pick) -> Callable:
    def run() -> None:
        y = pick(module(x.detach().requires_grad_()))
        y.backward(grad)

    return run


def profile(arm: str, steps: int) -> dict[str, float]:
    """Median seconds per step of each part (see the module docstring)."""
    t = Trainer(arm)
    lm, inputs = t.lm, {}
    hooks = []
    for i, block in enumerate(lm.blocks):
        for name, sub in (("attn", block.attn), ("ffn", block.ffn)):
            hooks.append(
                sub.register_forward_hook(
                    lambda m, args, out, key=(name, i): inputs.__setitem__(key, args[0])
                )
            )
    for _ in range(2):
        t.step()  # warm-up
    parts: dict[str, list[float]] = {}
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        whole = timed(t.step)
        idx_BS, targets_BS, _ = next(t.batches)
        measured = {"data": timed(lambda: next(t.batches))}
        for part, pick in (("attention", lambda y: y), ("FFN / MoE layers", lambda o: o.y)):
            key = "attn" if part == "attention" else "ffn"
            total = 0.0
            for i, block in enumerate(lm.blocks):
                x = inputs[(key, i)]
                grad = torch.randn(x.shape, generator=g)
                sub = block.attn if key == "attn" else block.ffn
                total += timed(replay(sub, x, grad, pick))
            measured[part] = total

        def ends(idx_BS: torch.Tensor = idx_BS, targets_BS: torch.Tensor = targets_BS) -> None:
            x_BSD = lm.tok_emb(idx_BS) + lm.pos_emb(torch.arange(idx_BS.shape[1]))
            logits = lm.head(lm.norm_out(x_BSD))
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets_BS.flatten()).backward()

        measured["embedding + output + loss"] = timed(ends)
        t.optimizer.zero_grad(set_to_none=True)
        out, _ = C.train_forward(lm, idx_BS, targets_BS, len(idx_BS), C.nullcontext)

        def optimize() -> None:
            torch.nn.utils.clip_grad_norm_(lm.parameters(), t.job.task.grad_clip)
            t.optimizer.step()
            lm.update_bias()

        measured["optimizer (clip, AdamW, bias)"] = timed(optimize)
        measured["statistics (TrainLog.add)"] = timed(lambda out=out: t.log.add(out, 1.0))
        measured["step"] = whole
        for k, v in measured.items():
            parts.setdefault(k, []).append(v)
    for h in hooks:
        h.remove()
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["other (autograd, Python)"] = out["step"] - sum(v for k, v in out.items() if k != "step")
    return out


def speed(rounds: int, steps: int, with_compile: bool) -> tuple[dict, dict[str, float]]:
    """Per (arm, option set): per-round tokens/s; and compile seconds where compiled."""
    sets = {
        "before": (),
        "after": ("task.fused_optimizer=true",),
        "ladder": ("task.fused_optimizer=true", "model=ladder"),
    }
    runs = {(arm, name): Trainer(arm, *o) for arm in ARMS for name, o in sets.items()}
    compile_s = {}
    if with_compile:
        runs[("dense", "after+compile")] = trainer = Trainer(
            "dense", "task.fused_optimizer=true", "task.compile=true"
        )
        compile_s["dense"] = timed(trainer.step)
    for trainer in runs.values():
        trainer.step()  # warm-up
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, trainer in runs.items():
            seconds = [timed(trainer.step) for _ in range(steps)]
            rates[key].append(trainer.tokens / statistics.median(seconds))
    return rates, compile_s


def markdown(shares: dict[str, dict[str, float]], rates: dict, compile_s: dict, args) -> str:
    load_before, load_after = args.load
    lines = [
        "# Convergence training speed on the claims preset's model",
        "",
        f"Written by `python scripts/train_speed.py --rounds {args.rounds} --steps {args.steps} "
        f"--profile-steps {args.profile_steps}"
        f"{' --compile' if args.compile else ''}` on {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} cores, torch {torch.__version__}, one thread per model; load "
        f"average {load_before:.2f} before, {load_after:.2f} after (shared machine: under "
        "load, so the absolute rates are low and noisy; the ratios are interleaved).",
        "",
        "## Profile: median seconds per step and share of the step",
        "",
        "| part | " + " | ".join(shares) + " |",
        "|---|" + "---|" * len(shares),
    ]
    for part in next(iter(shares.values())):
        cells = [f"{s[part] * 1e3:.1f} ms ({s[part] / s['step']:.0%})" for s in shares.values()]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Tokens/s, before (default path) and after (`task.fused_optimizer=true`)",
        "",
        "| arm | before tok/s | after tok/s | after/before, median [quartiles] over rounds |",
        "|---|---|---|---|",
    ]
    for arm in ARMS:
        before, after = rates[(arm, "before")], rates[(arm, "after")]
        ratio = [a / b for a, b in zip(after, before)]
        q1, med, q3 = quartiles(ratio)
        lines.append(
            f"| {arm} | {statistics.median(before):.0f} | {statistics.median(after):.0f} | "
            f"{med:.3f} [{q1:.3f}, {q3:.3f}] |"
        )
    lines += [
        "",
        "## The ladder's model (model=ladder, width 64; fused AdamW) against the claims model",
        "",
        "| arm | width 64 tok/s | width 64 / width 128, median [quartiles] over rounds |",
        "|---|---|---|",
    ]
    for arm in ARMS:
        small, after = rates[(arm, "ladder")], rates[(arm, "after")]
        q1, med, q3 = quartiles([a / b for a, b in zip(small, after)])
        lines.append(f"| {arm} | {statistics.median(small):.0f} | {med:.2f} [{q1:.2f}, {q3:.2f}] |")
    if compile_s:
        before = rates[("dense", "before")]
        comp = rates[("dense", "after+compile")]
        q1, med, q3 = quartiles([a / b for a, b in zip(comp, before)])
        lines += [
            "",
            f"dense with `task.compile=true` (and fused AdamW): {statistics.median(comp):.0f} "
            f"tok/s, {med:.3f} [{q1:.3f}, {q3:.3f}] x before; the first step (compiling) took "
            f"{compile_s['dense']:.0f} s, with the on-disk compile cache that earlier runs on "
            "this machine left (a cold cache compiles longer); the MoE arms are not compiled "
            "here: their routing's data-dependent shapes recompile.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per arm per round")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also dense with task.compile")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/ladder/train_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    shares = {arm: profile(arm, args.profile_steps) for arm in ARMS}
    rates, compile_s = speed(args.rounds, args.steps, args.compile)
    args.load = (load_before, os.getloadavg()[0])
    text = markdown(shares, rates, compile_s, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
