"""The result schema: every metric a job writes, its unit, how its rows are keyed, which way is
better, and the columns every row carries (docs/contract.md, section 5).

Tasks log through these names (`Recorder.log(schema.TOKENS_PER_S, ...)` fills the unit), the
report and the benchmark gate read through them, and the report tests build their rows with
`row(...)`, so a renamed metric is renamed everywhere at once or fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """One `metric` value of the result rows.

    `keys`: the extra columns that tell its rows apart besides `step` (`pass`, `layer`,
    `domain`, `expert`, `loss`); `better`: "min", "max" or None (no direction, no best mark).
    """

    name: str
    unit: str = ""
    better: str | None = None
    keys: tuple[str, ...] = ()
    description: str = ""

    def __str__(self) -> str:
        return self.name


# timing (task=throughput), memory (task=memory)
FWD_MS = Metric("fwd_ms", "ms", "min", ("pass",), "median forward time of the layer")
FWD_BWD_MS = Metric("fwd_bwd_ms", "ms", "min", ("pass",), "median forward+backward time")
TOKENS_PER_S = Metric("tokens_per_s", "tok/s", "max", ("pass",), "tokens over median time")
TFLOPS = Metric("tflops", "TFLOP/s", "max", ("pass",), "analytic FLOPs over median time")
RATIO_TO_DENSE = Metric(
    "ratio_to_dense", "x", "min", ("pass",),
    "median per-round ratio of layer time (memory: peak bytes) to that of a dense FFN with the "
    "same active FLOPs, timed interleaved in the same job",
)  # fmt: skip
PEAK_MEMORY_BYTES = Metric("peak_memory_bytes", "bytes", "min", ("pass",), "training-step peak")
# routing statistics (moe_bench.metrics), per layer (and "mean") and per domain
LOAD_ENTROPY = Metric("load_entropy", "", "max", ("layer", "domain"), "1 = perfect balance")
MAX_VIO_BATCH = Metric("max_vio_batch", "", "min", ("layer", "domain"), "MaxVio per batch")
MAX_VIO_GLOBAL = Metric("max_vio_global", "", "min", ("layer", "domain"), "MaxVio, whole set")
LOAD_CV = Metric("load_cv", "", "min", ("layer", "domain"), "std / mean of the loads")
DROP_FRACTION = Metric("drop_fraction", "", "min", ("layer", "domain"), "dropped / demanded")
UNROUTED_FRACTION = Metric("unrouted_fraction", "", "min", ("layer", "domain"), "tokens kept 0")
DEAD_EXPERTS = Metric("dead_experts", "experts", "min", ("layer", "domain"), "< 1% mean load")
EXPERTS_PER_TOKEN = Metric(
    "experts_per_token", "experts", None, ("layer", "domain"),
    "variable-k variants: mean kept routed FFN experts per token (columns min, max)",
)  # fmt: skip
ROUTER_ENTROPY = Metric("router_entropy", "nats", None, ("layer", "domain"), "confidence")
EXPERT_LOAD = Metric(
    "expert_load", "share", None, ("layer", "domain", "expert"), "share of kept assignments"
)
# training (task=convergence)
TRAIN_LOSS = Metric("train_loss", "nats", "min", (), "LM cross-entropy per byte")
AUX_LOSS = Metric("aux_loss", "", None, ("loss",), "weighted aux loss by name, and total")
VAL_LOSS = Metric("val_loss", "nats", "min", (), "validation cross-entropy per byte")
VAL_PPL = Metric("val_ppl", "", "min", (), "validation perplexity per byte")
# expert parallelism (task=expert_parallel, docs/expert_parallel.md), per layer (and "mean");
# rank_imbalance also per training step (column phase="train")
DEVICES_PER_TOKEN = Metric(
    "devices_per_token", "ranks", "min", ("layer",),
    "mean ranks a token's kept experts live on (column devices_per_token_max: the max)",
)  # fmt: skip
BYTES_PER_TOKEN = Metric(
    "bytes_per_token", "bytes", "min", ("layer",), "off-rank bytes of dispatch + combine per token"
)
REMOTE_FRACTION = Metric(
    "remote_fraction", "", "min", ("layer",), "kept assignments whose expert is on another rank"
)
RANK_IMBALANCE = Metric(
    "rank_imbalance", "x", "min", ("layer", "phase"), "max / mean token rows received per rank"
)
A2A_MS = Metric(
    "a2a_ms", "ms", "min", ("layer",),
    "forward dispatch + combine time (columns route_ms, dispatch_ms, expert_ms, combine_ms)",
)  # fmt: skip
RANK_TOKENS = Metric(
    "rank_tokens", "tokens", None, ("layer", "src", "dst"),
    "token rows sent from rank src to rank dst (column assignments: kept assignments)",
)  # fmt: skip
SPEEDUP_VS_EP1 = Metric(
    "speedup_vs_ep1", "x", "max", ("pass",),
    "time of the unsharded layer on one rank / the expert-parallel step, same job and tokens",
)  # fmt: skip
# the invariance suite (task=invariance, moe_bench/invariance.py)
INVARIANCE_DIFF = Metric(
    "invariance_diff", "", None, ("case", "split", "quantity"),
    "max |split - one forward| / max |one forward| of a quantity (columns tolerance, expect, "
    "passed)",
)  # fmt: skip
# simulated expert parallelism (task=ep_sim, docs/expert_parallel.md "Simulated scale"): one
# row per ranks x rule x placement, the mean over the replayed steps and layers (columns min,
# max, samples)
_SIM_KEYS = ("ranks", "rule", "placement")
SIM_STRAGGLER = Metric(
    "sim_straggler", "x", "min", _SIM_KEYS,
    "max / mean token rows received per rank (columns rows_max, rows_mean, assignments_max, "
    "assignments_mean, compute_straggler)",
)  # fmt: skip
SIM_DEVICES_PER_TOKEN = Metric(
    "sim_devices_per_token", "ranks", "min", _SIM_KEYS, "mean ranks a token is sent to"
)
SIM_NODES_PER_TOKEN = Metric(
    "sim_nodes_per_token", "nodes", "min", _SIM_KEYS, "mean nodes a token is sent to"
)
SIM_BYTES_PER_TOKEN = Metric(
    "sim_bytes_per_token", "bytes", "min", _SIM_KEYS,
    "off-rank bytes of dispatch + combine per token (columns: per-rank dispatch bytes, busiest "
    "rank, sent/received x intra/inter node)",
)  # fmt: skip
SIM_A2A_US = Metric(
    "sim_a2a_us", "us", "min", _SIM_KEYS,
    "estimated dispatch + combine time, each ending with its slowest rank (columns dispatch_us, "
    "combine_us)",
)  # fmt: skip
SIM_STEP_US = Metric(
    "sim_step_us", "us", "min", _SIM_KEYS,
    "estimated layer step on the critical path (columns compute_us, comm_us)",
)  # fmt: skip
SIM_SKIPPED = Metric(
    "sim_skipped", "", None, _SIM_KEYS, "a rule that cannot route at this layout (column reason)"
)
# the job itself: its wall time; its status is the job's state
JOB = Metric("job", "s", None, (), "one per job: wall seconds, the job's final status")

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        FWD_MS, FWD_BWD_MS, TOKENS_PER_S, TFLOPS, RATIO_TO_DENSE, PEAK_MEMORY_BYTES,
        LOAD_ENTROPY, MAX_VIO_BATCH, MAX_VIO_GLOBAL, LOAD_CV, DROP_FRACTION, UNROUTED_FRACTION,
        DEAD_EXPERTS, EXPERTS_PER_TOKEN, ROUTER_ENTROPY, EXPERT_LOAD, TRAIN_LOSS, AUX_LOSS,
        VAL_LOSS, VAL_PPL, JOB,
        DEVICES_PER_TOKEN, BYTES_PER_TOKEN, REMOTE_FRACTION, RANK_IMBALANCE, A2A_MS, RANK_TOKENS,
        SPEEDUP_VS_EP1, INVARIANCE_DIFF,
        SIM_STRAGGLER, SIM_DEVICES_PER_TOKEN, SIM_NODES_PER_TOKEN, SIM_BYTES_PER_TOKEN,
        SIM_A2A_US, SIM_STEP_US, SIM_SKIPPED,
    )
}  # fmt: skip

# extra columns of task=throughput rows (docs/contract.md §5): spread, noise flag, machine
TIMING_COLUMNS = (
    "iqr_ms", "min_ms", "max_ms", "repeats",  # fwd_ms / fwd_bwd_ms
    "noisy", "noisy_reason",  # every row: can the pass's median ratio be trusted, and why not
    "dense_ms", "dense_iqr_ms", "ratio_iqr", "ratio_min", "ratio_max", "ratio_ci95",  # ratio
    "load_avg", "load_avg_after", "threads",  # every throughput row
)  # fmt: skip

STATUSES = ("ok", "failed")  # how a finished job ended: the status its rows are stamped with
# a row's status: `running` until its job finishes (flushed mid-run), then the job's ending
ROW_STATUSES = ("running", *STATUSES)
# a job's state on disk (docs/contract.md §7): running (its lock is held), ok or failed (a
# closing `job` row), incomplete (started, never finished: killed, or its rows were cut)
JOB_STATES = ("running", "ok", "failed", "incomplete")
# first in every frame: who, what, the value, and how the job ended
CORE_COLUMNS = (
    "variant", "task", "backend", "device", "dtype", "seed",
    "metric", "value", "unit", "step", "status", "error",
    "params_total", "params_active", "flops_per_token",
)  # fmt: skip
# a row is unusable without these
REQUIRED_COLUMNS = ("variant", "task", "metric", "value", "status")
# the Parquet column types of the rows (moe_bench.rows writes and reads them); any other column
# takes the type of its values in each part file (a config value has one type in a job).
# `layer` is an integer or "mean" (§5): written as text, read back as an integer or "mean".
COLUMN_TYPES = {
    **dict.fromkeys(("variant", "task", "backend", "device", "dtype"), "string"),
    **dict.fromkeys(("metric", "unit", "status", "error"), "string"),
    "seed": "int64", "value": "double", "step": "int64", "layer": "string",
}  # fmt: skip


def metric(name: str | Metric) -> Metric:
    """The schema entry of a metric name; an unknown name is a ValueError naming the known ones."""
    if isinstance(name, Metric):
        return name
    if name not in METRICS:
        raise ValueError(f"metric={name!r} is not one of {', '.join(map(repr, METRICS))}")
    return METRICS[name]


def row(metric_: str | Metric, value: float, **columns: Any) -> dict[str, Any]:
    """One result row as a task writes it: metric, value, its unit, step, status ok."""
    m = metric(metric_)
    base = {"metric": m.name, "value": value, "unit": m.unit, "step": None, "status": "ok"}
    return {**base, "error": None, **columns}
