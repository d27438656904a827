"""moe_bench: the runner around `variants`: a Hydra app over `sweeps/`, tasks, results, report.

    moe-bench task=throughput variant=gshard              # or: python -m moe_bench ...
    python -m moe_bench -m variant=switch,gshard,deepseek_moe,deepseek_v3 task=throughput,memory
    python -m moe_bench +experiment=quick

From Python (a script or a notebook), without the command line:

    import moe_bench
    cfg = moe_bench.compose("variant=switch", "task=throughput", "model=tiny")
    job = moe_bench.config.resolve(cfg)          # the typed, immutable job record
    moe_bench.run_job(job, "out/switch")         # rows in out/switch/rows-*.parquet

See docs/contract.md (the contract) and docs/architecture.md (the house).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moe_bench.paths import config_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from moe_bench.config import Job


SWEEPS = config_dir()


def compose(*overrides: str, hydra: bool = False) -> DictConfig:
    """The config `python -m moe_bench OVERRIDES` would run (Hydra's compose API over sweeps/);
    `hydra=True` keeps the `hydra` node too (sweeper params, launcher)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from moe_bench import config, registry  # noqa: F401  (importing them registers the schemas)

    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra)


def run_job(job: Job, out_dir: str | Path) -> str:
    """Run one resolved job into `out_dir` as the runner would; returns its outcome: "ok",
    "failed", or, as on resume, "skipped" (ok results of this config are there already),
    "refused" (results of another config are) or "busy" (another run holds the folder)."""
    from moe_bench.runner import run_resolved

    return run_resolved(job, Path(out_dir))
