"""Structured configs for every group of `sweeps/`, the checks run before any work, and the
job record a task receives.

Hydra composes `sweeps/config.yaml` against these dataclasses in struct mode, so an override of
a key that does not exist, or a value of the wrong type, fails before a job starts, naming the
key. Range and cross-field rules live in each dataclass's `__post_init__` (the same check
helpers `variants` uses) and run in `resolve`, when a job turns its config into objects.

Groups:
- `variant/<name>.yaml`: `name` plus the variant's own config fields (schema generated from the
  variant's config dataclass, so its paper defaults live in one place: `variants/<name>.py`).
  The size fields `num_experts`, `expert_hidden`, `top_k` (and dense's `d_ff`) default to null:
  `moe_bench.isocompute` derives them from the `model` group so that every variant of a sweep
  activates the same expert FLOPs per token. `granularity` (or a fixed `top_k`) says how.
- `task/<name>.yaml`: one schema per task: the config dataclass of its `Task` object
  (`moe_bench/tasks/<name>.py`), put in the ConfigStore by `moe_bench.registry`.
- `model/<size>.yaml`: widths and token counts; `device/<kind>.yaml`; `data` (the corpus).

`resolve(cfg)` turns a composed config into a `Job`, once, in the runner; tasks receive the Job
(`run(job, recorder)`) and never see the DictConfig, so they can be called from Python without
Hydra. Importing this module registers the run and variant schemas, importing
`moe_bench.registry` the task schemas; `moe_bench.compose(...)` does both, so it (or Hydra's
compose API over `sweeps/`) works from scripts and notebooks. This module names no task.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from moe_bench import components
from moe_bench.components import Component
from moe_bench.data import DataConfig
from moe_bench.identity import SIZE_FIELDS
from moe_bench.isocompute import ffn_flops_per_token, iso_fields
from moe_bench.loggers import LoggerConfig
from variants import MoEConfig
from variants.contract.config import check_choice, check_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
# variant fields set once for the whole run (model.d_model, the top-level backend)
RUN_FIELDS = ("d_model", "backend")


@dataclass
class ModelConfig:
    """Sizes, as multiples of a dense FFN (the iso-compute reference; docs/contract.md §3)."""

    d_model: int = 128
    d_ff: int = 256  # width of the dense FFN one coarse expert replaces
    expansion: int = 16  # N: routed expert parameters = N dense FFNs (total-parameter multiple)
    active: int = 2  # K: expert FLOPs per token = K dense FFNs (active multiple)
    tokens: int = 2048  # T per forward: batch x sequence
    seq_len: int = 256  # S: tokens are shaped [tokens / seq_len, seq_len, d_model]
    # activation checkpointing of the MoE layers of a trained LM (task=convergence)
    checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "expansion", "active", "tokens", "seq_len"):
            check_int(self, name, 1)
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"checkpoint={self.checkpoint!r} must be true or false")
        if self.active > self.expansion:
            raise ValueError(f"active={self.active} must be <= expansion={self.expansion}")
        if self.tokens % self.seq_len:
            raise ValueError(f"tokens={self.tokens} must be divisible by seq_len={self.seq_len}")


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto: cuda when available, else cpu
    threads: int | None = None  # torch.set_num_threads; null leaves torch's default

    def __post_init__(self) -> None:
        check_choice(self, "name", DEVICES)
        if self.threads is not None:
            check_int(self, "threads", 1)

    def resolve(self) -> torch.device:
        if self.name == "cuda" and not torch.cuda.is_available():
            raise ValueError("device.name='cuda' but torch sees no CUDA device; use cpu or auto")
        if self.name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.name)


@dataclass
class TaskConfig:
    """The base of every task's config dataclass (each defined in its task's module,
    `moe_bench/tasks/<name>.py`, and registered by `moe_bench.registry`)."""

    name: str = MISSING


@dataclass
class RunConfig:
    variant: Any = MISSING  # typed by the variant's own schema (variant_schema)
    task: Any = MISSING  # typed by the task's schema (its Task's config, moe_bench.registry)
    model: ModelConfig = MISSING
    device: DeviceConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # live curves; not identity
    dtype: str = "float32"
    seed: int = 0
    backend: str = "loop"
    # resume: replace the rows of a job folder whose results came from another config
    overwrite: bool = False
    allow_cpu: bool = False  # run a GPU-sized job on a CPU anyway (gpu_sized)


def variant_schema(name: str) -> type:
    """The variant node's dataclass: `name`, `granularity`, and the variant's config fields.

    Generated from the variant's config dataclass so types and paper defaults have one home;
    size fields become optional (null = derived by iso-compute) and run-level fields are left
    to the top-level config.
    """
    config_cls = components.lookup(name).config
    hints = typing.get_type_hints(config_cls)
    fields: list[tuple[str, Any, Any]] = [
        ("name", str, field(default=name)),
        ("granularity", float | None, field(default=None)),
    ]
    for f in dataclasses.fields(config_cls):
        if f.name in RUN_FIELDS:
            continue
        if f.name in SIZE_FIELDS:
            fields.append((f.name, int | None, field(default=None)))
        else:
            fields.append((f.name, hints[f.name], field(default=f.default)))
    return dataclasses.make_dataclass(f"{name}_node", fields)


def register() -> None:
    """Put the run and variant schemas in Hydra's ConfigStore (idempotent; call before
    composing; the task schemas are `moe_bench.registry.register`'s).

    Schemas sit under `schema/` so that `variant=...` and `task=...` list only the YAML options.
    """
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name in components.names():
        cs.store(group="schema/variant", name=name, node=variant_schema(name))


# expert compute a CPU job may take (forward and backward FLOPs of the FFNs, layer and dense
# twin): about three minutes of a 2-core CPU at ~30 GFLOP/s; more is a GPU-sized job
CPU_TFLOP_BUDGET = 5.0


def gpu_sized(job: Job, tflop: float | None, allow_cpu: bool = False) -> str | None:
    """The one-line refusal of a job too big for the CPU it would run on (None: it fits).

    `tflop` is the task's estimate of the job's expert work (`Task.cost_tflop`; None: not
    estimated). model=medium/large and the GPU presets are GPU sizes; `allow_cpu=true` runs
    them on a CPU anyway.
    """
    if allow_cpu or job.device.type != "cpu" or tflop is None or tflop <= CPU_TFLOP_BUDGET:
        return None
    steps = ", fewer task.steps" if hasattr(job.task, "steps") else ""
    return (
        f"moe_bench: error: task={job.task.name} at model.d_model={job.model.d_model} is "
        f"GPU-sized: ~{tflop:.0f} TFLOP of expert compute, more than a CPU job's "
        f"{CPU_TFLOP_BUDGET:.0f}; run it on a GPU, scale it down (model=small{steps}), or "
        "add allow_cpu=true to run it on this CPU anyway"
    )


GROUPS = ("variant", "task", "model", "device", "data")


@dataclass(frozen=True)
class Job:
    """One job's config, resolved once by the runner and handed to its task.

    `columns` are the base columns of every row the job writes (names, every config value as
    a dotted key, the resolved layer sizes, parameter counts and FLOPs per token).
    """

    component: Component
    layer: MoEConfig
    task: TaskConfig
    model: ModelConfig
    device: torch.device
    threads: int | None
    dtype: torch.dtype
    seed: int
    backend: str
    data: DataConfig
    columns: dict[str, Any] = field(default_factory=dict, compare=False)
    logger: LoggerConfig = field(default_factory=LoggerConfig, compare=False)

    @property
    def variant(self) -> str:
        return self.component.name


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


def to_object(cfg: DictConfig, key: str) -> Any:
    """`cfg[key]` as its dataclass (running __post_init__); errors name the group.

    A `+group.key=value` override gets past struct mode; it is refused here instead of being
    silently ignored.
    """
    try:
        obj = OmegaConf.to_object(cfg[key])
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    known = [f.name for f in dataclasses.fields(obj)]
    unknown = sorted(set(cfg[key]) - set(known))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not a key of {key}; allowed: {', '.join(known)}")
    return obj


def variant_fields(cfg: DictConfig, model: ModelConfig) -> dict[str, Any]:
    """The variant's config fields: given values, sizes derived by iso-compute, run fields."""
    node = dataclasses.asdict(to_object(cfg, "variant"))
    name, granularity = node.pop("name"), node.pop("granularity")
    # null means "derive" for a size field; for any other field it is a value (capacity_factor)
    given = {k: v for k, v in node.items() if k not in SIZE_FIELDS or v is not None}
    missing = [k for k in SIZE_FIELDS if k in node and k not in given]
    config_cls = components.lookup(name).config
    if "top_k" in given:  # its own rule first: a clearer message than the sizes it implies
        config_cls.check_top_k(given["top_k"])
    derived = {}
    if missing:
        derived = iso_fields(
            config_cls,
            d_model=model.d_model,
            d_ff=model.d_ff,
            expansion=model.expansion,
            active=model.active,
            granularity=granularity,
            shared=given.get("num_shared_experts", 0),
            top_k=given.get("top_k"),
        )
    return {**derived, **given, "d_model": model.d_model, "backend": cfg.backend}


def check_top_level(cfg: DictConfig) -> None:
    """`+key=value` adds a key that struct mode lets through: refuse it before any work."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(cfg) - known - {"hydra"})
    if unknown:
        key, value = unknown[0], OmegaConf.to_container(cfg, resolve=False)[unknown[0]]
        if isinstance(value, dict):  # +foo.bar=1: name the leaf
            key, value = next(iter(flatten(value, key).items()), (key, value))
        raise ValueError(
            f"{key}={value!r} is not a key of the config; "
            f"allowed: {', '.join(sorted(known))} (and the keys inside them)"
        )


def derived_columns(component: Component, layer: MoEConfig) -> dict[str, Any]:
    """The counts the code derives from a layer config (`identity.DERIVED`), as row columns."""
    total, active = component.param_counts(layer)
    return {
        "params_total": total,
        "params_active": active,
        "flops_per_token": ffn_flops_per_token(layer),
        # the layer says whether its routing sees later tokens (expert_choice, scope "batch")
        "leaks_future_tokens": layer.leaks_future_tokens,
    }


def resolve(cfg: DictConfig) -> Job:
    """Validate every group and build the job record; ValueError names the key."""
    check_top_level(cfg)
    model = to_object(cfg, "model")
    device = to_object(cfg, "device")
    task = to_object(cfg, "task")
    data = to_object(cfg, "data")
    check_choice(cfg, "dtype", tuple(DTYPES))
    check_int(cfg, "seed", 0)
    name = cfg.variant.name
    component = components.lookup(name)
    try:
        layer = component.make_config(**variant_fields(cfg, model))
    except ValueError as e:
        raise ValueError(f"variant {name!r}: {e}") from None
    resolved_device = device.resolve()
    columns = {
        **config_columns(cfg),
        **flatten(dataclasses.asdict(layer), "variant"),
        "device": resolved_device.type,
        **derived_columns(component, layer),
    }
    return Job(
        component=component,
        layer=layer,
        task=task,
        model=model,
        device=resolved_device,
        threads=device.threads,
        dtype=DTYPES[cfg.dtype],
        seed=cfg.seed,
        backend=cfg.backend,
        data=data,
        columns=columns,
        logger=to_object(cfg, "logger"),
    )


register()
