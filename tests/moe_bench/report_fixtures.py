"""Synthetic Hydra multirun directories for the report tests (docs/contract.md §5 row format).

A sweep is `<sweep>/multirun.yaml` plus one numbered job directory per job holding
`results.jsonl`, `env.json` and `.hydra/overrides.yaml`. The rows are made up but shaped like
the runner's: every row carries the base columns, the metric, its unit, step and status, and
a finished job's rows end with its `job` row (`write_sweep` adds it when a job lacks one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from moe_bench import rows as part_rows
from moe_bench import schema

VARIANTS = ("dense", "switch", "gshard", "deepseek_moe", "mixtral", "expert_choice")
DOMAINS = ("prose", "code")


def answer(question: str, metric: str, words: str, pass_: str | None = None, unit=None) -> dict:
    return {"question": question, "metric": metric, "pass": pass_, "unit": unit, "words": words}


# The run card a task writes on its closing `job` row (docs/contract.md §5): made-up texts
# shaped like the tasks' own, so the report reads them from the rows as it does in a real sweep.
TASK_CARDS = {
    "throughput": (
        0,
        "How fast is one layer?",
        "Measure: tokens/s of one layer; beside it, ratio to dense: layer time / time of a "
        "dense FFN with the same active FLOPs per token, timed interleaved in the same job.",
        [answer("fastest", "tokens_per_s", "forward + backward tokens/s", "fwd_bwd")],
    ),
    "memory": (1, "How much memory does one training step take?", "Measure: peak memory.", []),
    "balance": (
        2,
        "How evenly does an untrained router spread tokens?",
        "Measure: MaxVio_global of untrained routers.",
        [answer("most balanced untrained", "max_vio_global", "MaxVio_global")],
    ),
    "convergence": (
        3,
        "How well and how fast does a small LM train with the layer?",
        "Measure: final validation loss of a small byte-level LM.",
        [
            answer("most balanced after training", "max_vio_global", "MaxVio_global"),
            answer("best quality", "val_loss", "validation bits per byte", unit="bits/byte"),
        ],
    ),
    "expert_parallel": (
        4,
        "How much traffic does expert parallelism send?",
        "Measure: ranks and bytes per token of one eval forward.",
        [
            answer("least traffic", "devices_per_token", "ranks per token"),
            answer("best rank balance", "rank_imbalance", "rank imbalance"),
        ],
    ),
}
VARIANT_NOTES = {v: f"{v}: how this layer normalises its balance loss (made up)." for v in VARIANTS}
ENV_CARD = {
    "env.cpu": "Synthetic CPU",
    "env.gpu": None,
    "env.cores": 2,
    "env.threads": 2,
    "env.torch": "2.13.0",
    "env.cuda": None,
    "env.python": "3.12.1",
    "env.platform": "Linux-synthetic",
    "env.commit": "abc1234",
    "env.date": "2026-01-02 03:04:05 UTC",
}


def card(task: str, variant: str) -> dict[str, Any]:
    """The run card columns of one job's closing `job` row."""
    if task not in TASK_CARDS:
        return dict(ENV_CARD)
    order, ask, measure, answers = TASK_CARDS[task]
    return {
        **ENV_CARD,
        "card.task_order": order,
        "card.task_ask": ask,
        "card.task_measure": measure,
        "card.task_answers": json.dumps(answers),
        "card.variant_note": VARIANT_NOTES.get(variant, ""),
    }


def base(variant: str, task: str, seed: int = 0, **config: Any) -> dict[str, Any]:
    """Columns every row of one job carries."""
    experts = config.pop("variant.num_experts", 8)
    return {
        "variant": variant,
        "task": task,
        "backend": "loop",
        "device": "cpu",
        "dtype": "float32",
        "seed": seed,
        "params_total": 66_000 if variant == "dense" else 8 * 33_000,
        "params_active": 66_000,
        "flops_per_token": 132_000,
        "model.d_model": 64,
        "variant.num_experts": None if variant == "dense" else experts,
        **config,
    }


def row(common: dict[str, Any], metric: str, value: float, unit: str = "", **extra: Any) -> dict:
    """One row through the schema (`schema.row`: its unit, status ok); `unit` is ignored, kept
    so call sites read like the rows they make."""
    return {**common, **schema.row(metric, value, **extra)}


def throughput_job(
    variant: str,
    seed: int = 0,
    tokens: int = 512,
    experts: int = 8,
    speed: float | None = None,
    ratio: float | None = None,
    iqr: float = 0.02,
    noisy: bool | None = None,
) -> list[dict]:
    """Timing rows of one job; `iqr` is the IQR of the timed repeats relative to the median."""
    common = base(
        variant, "throughput", seed, **{"model.tokens": tokens, "variant.num_experts": experts}
    )
    if speed is None:
        speed = 1e5 / (1 + VARIANTS.index(variant)) * (1 + 0.01 * seed) * math.sqrt(tokens / 512)
    if ratio is None:
        ratio = 1 / (1 + VARIANTS.index(variant))
    flags = {} if noisy is None else {"noisy": noisy}
    rows = []
    for pass_, factor in (("fwd", 1.0), ("fwd_bwd", 1 / 3)):
        ms = tokens / (speed * factor) * 1e3
        at = {"pass": pass_}
        rate = speed * factor
        rows.append(row(common, "tokens_per_s", rate, "tok/s", **at, **flags))
        rows.append(row(common, "tflops", rate * common["flops_per_token"] / 1e12, **at, **flags))
        rows.append(row(common, f"{pass_}_ms", ms, "ms", iqr_ms=iqr * ms, **at, **flags))
        # `iqr` also sets the interleaved ratio's 95% half-width, relative to the ratio
        ci = {"ratio_ci95": iqr * ratio}
        rows.append(row(common, "ratio_to_dense", ratio, "x", **at, **ci, **flags))
    return rows


def memory_job(variant: str, seed: int = 0) -> list[dict]:
    common = base(variant, "memory", seed)
    peak = (1 + VARIANTS.index(variant)) * 3 * 2**20
    return [row(common, "peak_memory_bytes", peak, "bytes", **{"pass": "fwd_bwd"})]


def convergence_job(
    variant: str, seed: int = 0, steps: int = 6, layers: int = 2, experts: int = 4
) -> list[dict]:
    common = base(variant, "convergence", seed, **{"variant.num_experts": experts})
    offset = 0.05 * VARIANTS.index(variant) + 0.01 * seed
    rows = []
    for step in range(steps):
        loss = 5.0 * math.exp(-step / steps) + offset
        rows.append(row(common, "train_loss", loss, "nats", step=step, wall_s=0.2 * step))
        speed = 1e4 / (1 + VARIANTS.index(variant)) * (1 + 0.05 * (step % 2))
        rows.append(row(common, "tokens_per_s", speed, step=step, **{"pass": "fwd_bwd"}))
        if variant != "dense":
            rows.append(row(common, "aux_loss", 0.01, "", step=step, loss="total"))
            if step < steps - 1:  # the last step's drop fraction is the leaderboard's, below
                rows.append(row(common, "drop_fraction", 0.1 / (1 + step), step=step))
            rows.append(
                row(common, "max_vio_batch", 1.0 / (1 + step) + offset, "", step=step, layer="mean")
            )
        if step % 2 == 1 or step == steps - 1:
            rows.append(row(common, "val_loss", loss + 0.1, "nats", step=step, wall_s=0.2 * step))
    if variant == "dense":
        return rows
    for layer in range(layers):
        for name, value in (("max_vio_global", 0.3 + offset), ("load_entropy", 0.95 - offset)):
            rows.append(row(common, name, value, "", step=steps - 1, layer=layer))
        for step in (steps // 2, steps - 1):  # expert load at two steps: it moves in training
            for domain_i, domain in enumerate(DOMAINS):
                for expert in range(experts):
                    count = 100 + 40 * ((expert + domain_i + layer + step) % experts)
                    at = {"layer": layer, "expert": expert, "domain": domain}
                    rows.append(row(common, "expert_load", count, step=step, **at))
    for name, value in (("max_vio_global", 0.3 + offset), ("load_entropy", 0.95 - offset)):
        rows.append(row(common, name, value, "", step=steps - 1, layer="mean"))
    rows.append(row(common, "drop_fraction", 0.02 * VARIANTS.index(variant), "", step=steps - 1))
    return rows


def expert_parallel_job(
    variant: str, seed: int = 0, ranks: int = 2, steps: int = 4, **config: Any
) -> list[dict]:
    """task=expert_parallel rows (moe_bench/tasks/expert_parallel.py): traffic per layer,
    the rank-to-rank matrix, speedup against ep_size=1, rank_imbalance per training step.
    (No tokens_per_s rows: they would join the throughput figures' bars.)"""
    common = base(variant, "expert_parallel", seed, **{"task.ep_size": ranks, **config})
    spread = 1 + VARIANTS.index(variant) % 3 + config.get("variant.max_devices", 0)
    rows = []
    for layer in (0, "mean"):
        rows.append(
            row(common, "devices_per_token", 1.0 + 0.2 * spread, "ranks", layer=layer,
                devices_per_token_max=2)
        )  # fmt: skip
        rows.append(row(common, "bytes_per_token", 100.0 * spread, "bytes", layer=layer))
        rows.append(row(common, "remote_fraction", 0.1 * spread, "", layer=layer))
        rows.append(row(common, "rank_imbalance", 1.1, "x", layer=layer, phase="eval"))
        rows.append(row(common, "a2a_ms", 2.0, "ms", layer=layer, dispatch_ms=1.0))
    for src in range(ranks):
        for dst in range(ranks):
            value = 50 + 10 * ((src + dst * spread) % ranks)
            rows.append(row(common, "rank_tokens", value, "tokens", layer=0, src=src, dst=dst))
    for pass_ in ("fwd", "fwd_bwd"):
        rows.append(row(common, "speedup_vs_ep1", 0.5, "x", **{"pass": pass_}))
    for step in range(steps):
        value = 1.5 - 0.05 * step * spread
        rows.append(row(common, "rank_imbalance", value, "x", step=step, layer=0, phase="train"))
    return rows


def failed_job(variant: str, task: str, error: str, seed: int = 0) -> list[dict]:
    failed = {**row(base(variant, task, seed), "job", None), **card(task, variant)}
    return [{**failed, "status": "failed", "error": error}]


def closed(rows: list[dict], carded: bool = True) -> list[dict]:
    """A finished job's rows: they end with its `job` row (docs/contract.md §5, §7), which
    carries the run card unless `carded` is False (rows from before the card)."""
    if rows and rows[-1].get("metric") == "job":
        return rows
    first = rows[0]
    end = row({k: v for k, v in first.items() if k not in SELF}, "job", 1.0, "s")
    extra = card(first["task"], first.get("variant", "")) if carded and "task" in first else {}
    return [*rows, {**end, **extra}]


SELF = ("metric", "value", "unit", "step", "status", "error", "pass", "layer", "domain", "expert")


def frame(jobs: list[list[dict]]) -> pd.DataFrame:
    """The rows of `jobs` in one frame, shaped as results.load returns them (job_dir = index)."""
    return pd.DataFrame([{**r, "job_dir": str(n)} for n, rows in enumerate(jobs) for r in rows])


def write_sweep(
    root: Path,
    jobs: list[list[dict]],
    overrides: list[str] | None = None,
    carded: bool = True,
    parquet: bool = False,
) -> Path:
    """Write a multirun directory with one job per entry of `jobs` (their `job` rows with the
    run card unless `carded` is False: then an env.json per job, as before the card), as
    results.jsonl, or with `parquet` as part files of up to 50 rows (`moe_bench.rows`)."""
    root.mkdir(parents=True, exist_ok=True)
    overrides = overrides or ["variant=dense,switch", "task=throughput"]
    (root / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n" + "".join(f"    - {o}\n" for o in overrides)
    )
    for n, rows in enumerate(jobs):
        job = root / str(n)
        (job / ".hydra").mkdir(parents=True, exist_ok=True)
        first = rows[0]
        variant, task = first.get("variant"), first.get("task")  # a test may have removed them
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- variant={variant}\n- task={task}\n- seed={first['seed']}\n"
        )
        done = closed(rows, carded)
        if parquet:
            for number, start in enumerate(range(0, len(done), 50)):
                part_rows.write_part(job, number, done[start : start + 50])
        else:
            (job / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
        if carded:
            continue
        env = {
            "torch": "2.13.0",
            "device": "cpu",
            "cpu": "Synthetic CPU",
            "threads": 2,
            "git_commit": "abc1234",
            "command": "python -m moe_bench -m " + " ".join(overrides),
        }
        (job / "env.json").write_text(json.dumps(env))
    return root
