"""race: time several variants and the dense reference round-robin in one process.

The throughput task times one layer against its dense twin; a sweep of throughput jobs then
compares layers timed minutes apart, on a machine whose load and clock may have moved between
them. A race times every arm in the same rounds: the job's own variant, then each variant named
in `task.variants` (sized like a job of that variant: the model group's iso-compute sizes, the
variant's paper defaults, the job's backend), then the dense FFN of the job's layer (the
reference of every ratio, as in the throughput task). After warm-up of all, each round times
every arm once, starting at arm r mod n in round r (`moe_bench.timing.time_rounds`), so no arm
always runs first and a change of load hits all arms of a round alike; more rounds, up to
`task.max_repeats`, run until every arm's median ratio is known within +-`task.precision`.

Rows per arm and pass, docs/contract.md section 5: the throughput task's rows (`fwd_ms` /
`fwd_bwd_ms` with their spread, `tokens_per_s`, `tflops`, and `ratio_to_dense` with
`ratio_ci95`: the median over rounds of arm time / reference time), with the arm's own
`variant`, `variant.*` sizes, `params_total`, `params_active`, `flops_per_token` and
`leaks_future_tokens`; the other base columns are the job's. `noisy` / `noisy_reason` per arm
come from its per-round ratios (`moe_bench.timing.ratio_noise`). The reference's rows carry
`reference` true and no ratio (it is the base of every ratio, never flagged); every other row
`reference` false. A job of variant=dense thus also times dense against its twin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe_bench import components, schema
from moe_bench.components import Component
from moe_bench.config import Job, derived_columns, flatten, variant_fields, variant_schema
from moe_bench.isocompute import dense_reference, ffn_flops_per_token
from moe_bench.paths import config_dir
from moe_bench.progress import Rows
from moe_bench.recorder import Recorder, load_average
from moe_bench.task import Answer, Asks, Task
from moe_bench.tasks import STEPS, build_layer, random_input
from moe_bench.tasks.throughput import (
    METRICS,
    ThroughputConfig,
    log_ratio,
    log_speed,
    noise,
    pass_factor,
)
from moe_bench.timing import PairTiming, time_rounds
from variants import MoEConfig


@dataclass
class RaceConfig(ThroughputConfig):
    name: str = "race"
    variants: list[str] = field(default_factory=list)  # raced beside the job's own variant

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [name for name in self.variants if name not in components.names()]
        if unknown:
            allowed = ", ".join(components.names())
            raise ValueError(f"variants: {unknown[0]!r} is not one of {allowed}")


def with_layer(job: Job, component: Component, layer: MoEConfig) -> Job:
    """The job with another layer, its columns describing that layer (the rest the job's)."""
    columns = {
        **{key: None for key in job.columns if key.startswith("variant.")},
        **flatten(dataclasses.asdict(layer), "variant"),
        "variant": component.name,
        **derived_columns(component, layer),
    }
    return dataclasses.replace(job, component=component, layer=layer, columns=columns)


def variant_node(name: str) -> DictConfig:
    """`sweeps/variant/<name>.yaml` over its schema: what `variant=<name>` composes (each such
    file's defaults list is its schema alone)."""
    own = OmegaConf.load(config_dir() / "variant" / f"{name}.yaml")
    own.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(variant_schema(name)), own)


def arm_job(job: Job, name: str) -> Job:
    """The job as if it had been run with variant=`name`: that variant's YAML, sizes derived by
    iso-compute from the job's model group, the job's backend."""
    node = OmegaConf.create({"variant": variant_node(name), "backend": job.backend})
    component = components.lookup(name)
    layer = component.make_config(**variant_fields(node, job.model))
    return with_layer(job, component, layer)


def reference_job(job: Job) -> Job:
    """The dense FFN with the active expert FLOPs of the job's layer (`tasks.build_dense`)."""
    dense = components.lookup(components.BASELINE)
    return with_layer(job, dense, dense.make_config(**dense_reference(job.layer)))


def arms(job: Job) -> list[Job]:
    """The job's own variant first, then each of `task.variants` not already in the race."""
    task: RaceConfig = job.task
    others = [name for name in dict.fromkeys(task.variants) if name != job.variant]
    return [job, *(arm_job(job, name) for name in others)]


def run(job: Job, recorder: Recorder) -> None:
    task: RaceConfig = job.task
    load_before = load_average()
    racers, reference = arms(job), reference_job(job)
    layers = [build_layer(racer) for racer in [*racers, reference]]
    x = random_input(job)
    for pass_ in task.passes:
        *times, reference_time = time_rounds(
            [STEPS[pass_](layer, x) for layer in layers], job.device, task.warmup, task.repeats,
            pass_, max_repeats=task.max_repeats, precision=task.precision,
        )  # fmt: skip
        machine = {
            "load_avg": load_before,
            "load_avg_after": load_average(),
            "threads": torch.get_num_threads(),
        }
        for racer, time in zip(racers, times):
            pair = PairTiming(time, reference_time)
            keys: dict[str, Any] = {**racer.columns, **noise(pair), **machine, "reference": False}
            log_speed(recorder, racer, pass_, time, **keys)
            log_ratio(recorder, pass_, pair, **keys)
        keys = {**reference.columns, "noisy": False, "noisy_reason": "", **machine}
        log_speed(recorder, reference, pass_, reference_time, **keys, reference=True)
    recorder.flush()


def cost_tflop(job: Job) -> float:
    """Expert work of every arm and the reference over warm-up and repeats, every pass (each arm
    has the job's active FLOPs per token: iso-compute sizes them alike)."""
    task: RaceConfig = job.task
    arms_ = 2 + len(set(task.variants) - {job.variant})
    forwards = sum(pass_factor(p) for p in task.passes)
    tokens = arms_ * (task.warmup + task.repeats) * job.model.tokens * forwards
    return ffn_flops_per_token(job.layer) * tokens / 1e12


def summary(rows: Rows) -> str | None:
    """Each arm's ratio to dense, fastest first, in the last pass that has them."""
    for pass_ in ("fwd_bwd", "fwd"):
        found = [r for r in rows if r.get("metric") == "ratio_to_dense" and r.get("pass") == pass_]
        if found:
            arms_ = [
                f"{r['variant']} x{r['value']:.2f}" + (" NOISY" if r.get("noisy") else "")
                for r in sorted(found, key=lambda r: r["value"])
            ]
            return f"{pass_} vs dense: " + ", ".join(arms_)
    return None


TASK = Task(
    name="race",
    config=RaceConfig,
    run=run,
    metrics=METRICS,
    cost_tflop=cost_tflop,
    summary=summary,
    timed=True,
    report=Asks(
        order=5,
        ask="Which layer is fastest, timed in the same rounds?",
        measure=(
            "Measure: tokens/s of each layer (tokens / median time of the timed rounds), "
            "forward + backward and forward only, every layer and the dense reference timed "
            "round-robin in one process, so the ranking is taken at one moment; ratio to "
            "dense: the median over rounds of layer time / reference time, with its 95% "
            "interval. The reference is its own row, dense (reference): shown, never ranked."
        ),
        answers=(Answer("fastest", schema.TOKENS_PER_S, "forward + backward tokens/s", "fwd_bwd"),),
    ),
)
