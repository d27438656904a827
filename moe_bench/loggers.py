"""Live curves: a job's rows as TensorBoard or Weights & Biases scalars while it runs.

`logger=tensorboard` writes torch's SummaryWriter event files into `<job folder>/tensorboard/`
(`tensorboard --logdir SWEEP_DIR` shows every job as a run); `logger=wandb` starts a W&B run in
the job folder, offline unless `logger.mode=online` (`wandb sync` uploads it later; wandb is
the optional extra `moe-bench[wandb]`). Off by default (`logger=none`). The rows stay the
source of truth: a logger only sees each row of rank 0 as the task logs it (the tasks that
attach one: convergence, its training and evaluation rows as they come; expert_parallel, its
rows when its ranks return) and never enters a job's config identity.

A row becomes one scalar: its tag is the metric and its key columns (`schema.Metric.keys`),
e.g. `load_entropy/layer=0`, `expert_load/layer=1/domain=code/expert=3`, `aux_loss/loss=z`;
its step is the row's `step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_bench import schema

NAMES = ("none", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
FLUSH_S = 10  # seconds between TensorBoard's writes to disk: curves move while a job runs


@dataclass
class LoggerConfig:
    """The `logger` config group (sweeps/logger/)."""

    name: str = "none"  # none, tensorboard, wandb
    project: str = "moe-bench"  # wandb: the project its runs go to
    mode: str = "offline"  # wandb: offline (no network; `wandb sync` later), online, disabled

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"name={self.name!r} is not one of {', '.join(NAMES)}")
        if self.mode not in WANDB_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {', '.join(WANDB_MODES)}")


def tag(row: dict[str, Any]) -> str:
    """`metric/key=value/...` over the metric's key columns the row has."""
    keys = schema.metric(row["metric"]).keys
    return "/".join([row["metric"], *(f"{k}={row[k]}" for k in keys if row.get(k) is not None)])


def scalar(row: dict[str, Any]) -> tuple[str, float, int | None] | None:
    """(tag, value, step) of a row, or None for the `job` row and rows without a value."""
    if row["metric"] == schema.JOB.name or row.get("value") is None:
        return None
    return tag(row), float(row["value"]), row.get("step")


class TensorBoard:
    """Rows as SummaryWriter scalars in `<out_dir>/tensorboard`."""

    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"), flush_secs=FLUSH_S)

    def row(self, row: dict[str, Any]) -> None:
        found = scalar(row)
        if found:
            self.writer.add_scalar(found[0], found[1], global_step=found[2])

    def close(self) -> None:
        self.writer.close()


class WandB:
    """Rows as a W&B run's metrics, stepped by the rows' `step` (which evaluation rows revisit,
    so the step is a metric of its own, not W&B's monotonic step)."""

    def __init__(self, out_dir: Path, config: LoggerConfig, columns: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("logger=wandb needs wandb: pip install 'moe-bench[wandb]'") from None
        self.run = wandb.init(
            project=config.project,
            mode=config.mode,
            dir=str(out_dir),
            name=f"{columns.get('variant')} seed={columns.get('seed')} ({out_dir})",
            group=str(out_dir.parent),
            config={k: v for k, v in columns.items() if not k.startswith(("env.", "card."))},
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def row(self, row: dict[str, Any]) -> None:
        found = scalar(row)
        if found:
            self.run.log({found[0]: found[1], "step": found[2] or 0})

    def close(self) -> None:
        self.run.finish()


def attach(config: LoggerConfig, recorder: Any) -> None:
    """Give a job's Recorder the live logger its `logger` config asks for (none: nothing)."""
    if config.name == "tensorboard":
        recorder.sinks.append(TensorBoard(recorder.out_dir))
    elif config.name == "wandb":
        recorder.sinks.append(WandB(recorder.out_dir, config, recorder.base))
