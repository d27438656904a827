"""`python -m moe_bench`: the Hydra application over `sweeps/` (SPEC sections 5-6).

One job = one composed config: resolve and validate it, skip it if its directory already holds
ok results (resume), run its task, write results.jsonl and env.json. A job that fails writes a
`failed` row with its error; in a multirun the sweep goes on, a single run exits with status 1.
Expected problems (bad values, impossible combinations, out of memory) print one line; anything
else also logs its traceback to the job's log.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import variants
from moe_bench import config, peers, results
from moe_bench.isocompute import count_params, ffn_flops_per_token
from moe_bench.tasks import get_task

log = logging.getLogger(__name__)
GROUPS = ("variant", "task", "model", "device", "data")
# failures a sweep expects (bad values, impossible combinations, too big for the device): one line
EXPECTED = (ValueError, FloatingPointError, torch.OutOfMemoryError)  # not bugs: no traceback


def flatten(node: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Nested config values as dotted columns; lists become comma-joined strings."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def config_columns(cfg: DictConfig) -> dict[str, Any]:
    """Base columns known without resolving: names and every given config value."""
    columns = {
        "variant": cfg.variant.name,
        "task": cfg.task.name,
        "backend": cfg.backend,
        "device": cfg.device.name,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
    }
    for group in GROUPS:
        columns.update(flatten(OmegaConf.to_container(cfg[group], resolve=True), group))
    return columns


def param_counts(run: config.Resolved) -> tuple[int, int]:
    """(total, active) parameters of the job's layer, counted without allocating it."""
    if run.variant in peers.PEERS:  # megablocks cannot be built off its GPU: count its shapes
        return peers.param_counts(run.layer)
    with torch.device("meta"):
        return count_params(variants.lookup(run.variant).make(run.layer))


def resolved_columns(cfg: DictConfig, run: config.Resolved) -> dict[str, Any]:
    """Base columns of a valid job: resolved device and variant sizes, params and FLOPs."""
    total, active = param_counts(run)
    return {
        **config_columns(cfg),
        **flatten(dataclasses.asdict(run.layer), "variant"),
        "device": run.device.type,
        "params_total": total,
        "params_active": active,
        "flops_per_token": ffn_flops_per_token(run.layer),
    }


def execute(cfg: DictConfig, out_dir: Path, label: str) -> str:
    """Run one job into out_dir; returns "ok", "failed" or "skipped"."""
    if results.completed(out_dir):
        print(f"skipped  {label}: {out_dir} already holds ok results")
        return "skipped"
    recorder = None
    try:
        run = config.resolve(cfg)
        task = get_task(run.task.name)
        if run.threads is not None:
            torch.set_num_threads(run.threads)
        recorder = results.Recorder(out_dir, resolved_columns(cfg, run))
        results.write_env(out_dir, run.device, overrides=label)
        task(cfg, recorder)
    except Exception as e:
        error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, EXPECTED):
            log.exception("job failed")  # a bug: keep its traceback in the job's log
        recorder = recorder or results.Recorder(out_dir, config_columns(cfg))
        recorder.finish("failed", error)
        print(f"failed   {label}: {error}", file=sys.stderr)
        return "failed"
    recorder.finish("ok")
    seconds = recorder.rows[-1]["value"]
    print(f"ok       {label}: {len(recorder.rows)} rows in {seconds:.1f} s -> {out_dir}")
    return "ok"


@hydra.main(version_base="1.3", config_path="../sweeps", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    label = " ".join(hc.overrides.task) or f"variant={cfg.variant.name} task={cfg.task.name}"
    status = execute(cfg, Path(hc.runtime.output_dir), label)
    if status == "failed" and hc.mode != RunMode.MULTIRUN:
        sys.exit(1)


if __name__ == "__main__":
    config.register()
    main()
