"""ep_sim: a routing replayed over 8 to 1024 simulated ranks (docs/expert_parallel.md,
"Simulated scale"); counting and a machine model, no process group.

Shape legend: B sequences, S sequence length, P ranks.

Routing (`task.source`):
- `trace`: a routing trace with its routers' inputs (`moe_bench.trace`), e.g. the committed
  one of a short training run (`task.trace`, relative to the repository root);
- `router`: the job's variant in an untrained tiny LM (`task.n_layers` blocks of width
  `model.d_model`, seeded by `seed`) on `task.router_steps` batches of the embedded corpus,
  recorded the same way, so trained and untrained routers go through one path.
For each `task.ranks` (P, in nodes of `task.ranks_per_node`), each rule of `task.rules` and
each placement of `task.placements`, `moe_bench.epsim.replay` counts every replayed step and
layer with `task.tokens_per_rank` tokens per rank; bytes, FLOPs and times are those of a layer
of `task.d_model` x `task.expert_hidden` on the machine of the `task.*_gbps`, `latency_us`,
`gemm_tflops` and `overlap` fields (defaults: DeepEP's published H800 numbers).

Rows (docs/contract.md §5): per (ranks, rule, placement) the mean over the replayed steps and
layers, columns `min`, `max`, `samples`, `nodes`: `sim_straggler`, `sim_devices_per_token`,
`sim_nodes_per_token`, `sim_bytes_per_token`, `sim_a2a_us`, `sim_step_us`; `sim_skipped`
(column `reason`) where a rule cannot route at that layout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_bench import data, paths, schema
from moe_bench.config import Job, TaskConfig
from moe_bench.epsim.placement import PLACEMENTS
from moe_bench.epsim.replay import Layout, Result, replay
from moe_bench.epsim.rules import Rule
from moe_bench.epsim.traffic import Machine, Sizes, Step
from moe_bench.lm import LMConfig, build_lm
from moe_bench.recorder import Recorder
from moe_bench.task import Asks, Task
from moe_bench.trace import Trace, load_trace
from moe_bench.trace_recorder import TraceRecorder
from variants.contract.config import check_choice, check_int, check_number

log = logging.getLogger(__name__)
SOURCES = ("trace", "router")


@dataclass
class EPSimConfig(TaskConfig):
    """task=ep_sim; machine defaults: `moe_bench.epsim.traffic.Machine`."""

    name: str = "ep_sim"
    source: str = "trace"  # trace: task.trace; router: the variant untrained, on the corpus
    trace: str = "reports/ep_scale/trace.npz"  # relative to the repository root, or absolute
    ranks: list[int] = field(default_factory=lambda: [8, 32, 128, 512, 1024])
    ranks_per_node: int = 8
    tokens_per_rank: int = 128
    rules: list[str] = field(
        default_factory=lambda: ["topk", "device:1", "device:2", "device:3", "node:2"]
    )
    placements: list[str] = field(default_factory=lambda: ["contiguous", "eplb"])
    redundant_per_rank: int = 1  # EPLB's spare expert slots on every rank
    # the modelled layer (bytes, FLOPs): DeepSeek-V3's widths, arXiv:2412.19437 Sec. 4.2
    d_model: int = 7168
    expert_hidden: int = 2048
    x_bytes: int = 2
    intra_gbps: float = Machine.intra_gbps
    inter_gbps: float = Machine.inter_gbps
    latency_us: float = Machine.latency_us
    gemm_tflops: float = Machine.gemm_tflops
    overlap: bool = False
    # source=router: the untrained LM and its batches (the committed trace's run's sizes)
    router_steps: int = 4
    batch_size: int = 16
    seq_len: int = 128
    n_layers: int = 2
    n_heads: int = 4

    def __post_init__(self) -> None:
        check_choice(self, "source", SOURCES)
        for name in ("ranks_per_node", "tokens_per_rank", "redundant_per_rank", "d_model"):
            check_int(self, name, 1)
        for name in ("expert_hidden", "x_bytes", "batch_size", "seq_len", "n_layers"):
            check_int(self, name, 1)
        check_int(self, "router_steps", 2)
        check_int(self, "n_heads", 1)
        for name in ("intra_gbps", "inter_gbps", "gemm_tflops"):
            check_number(self, name, positive=True)
        check_number(self, "latency_us", minimum=0)
        for value in self.ranks:
            if not isinstance(value, int) or value < 1 or value % self.ranks_per_node:
                raise ValueError(
                    f"task.ranks holds {value!r}; allowed: positive multiples of "
                    f"task.ranks_per_node={self.ranks_per_node}"
                )
        for name in self.placements:
            if name not in PLACEMENTS:
                raise ValueError(
                    f"task.placements holds {name!r}; allowed: {', '.join(PLACEMENTS)}"
                )
        for text in self.rules:
            Rule.parse(text)

    def machine(self) -> Machine:
        return Machine(
            self.intra_gbps, self.inter_gbps, self.latency_us, self.gemm_tflops, self.overlap
        )


def trace_path(task: EPSimConfig) -> Path:
    path = Path(task.trace)
    return path if path.is_absolute() else paths.config_dir().parent / path


@torch.no_grad()
def untrained_trace(job: Job) -> Trace:
    """The variant's routing in an untrained tiny LM on corpus batches, with router inputs."""
    task: EPSimConfig = job.task
    cfg = LMConfig(
        d_model=job.model.d_model,
        n_layers=task.n_layers,
        n_heads=task.n_heads,
        seq_len=task.seq_len,
    )
    torch.manual_seed(job.seed)
    lm = build_lm(job.variant, dataclasses.asdict(job.layer), cfg).eval()
    meta = {
        "variant": job.variant,
        "num_experts": job.layer.num_experts,
        "top_k": job.layer.top_k,
        "d_model": job.model.d_model,
        "tokens_per_step": task.batch_size * task.seq_len,
        "seed": job.seed,
        "trained_steps": 0,
    }
    recorder = TraceRecorder(lm, 1, None, True, meta)
    log.info("ep_sim router: routing %d corpus batches through the untrained LM", task.router_steps)
    corpus = data.load(job.data)
    batches = corpus.batches(
        "train", task.batch_size, task.seq_len, torch.Generator().manual_seed(job.seed)
    )
    for step in range(1, task.router_steps + 1):
        idx_BS, _, domain_B = next(batches)
        with recorder.capture(step):
            out = lm(idx_BS)
        recorder.record(step, out, idx_BS, domain_B)
    return recorder.trace()


def step_values(sim: Step) -> dict[schema.Metric, tuple[float, dict[str, float]]]:
    """One replayed step's value and columns per metric."""
    rows, assign = sim.rows_received, sim.assignments_received
    per_rank = sim.dispatch_bytes_4P
    busiest = per_rank.sum(0).argmax()
    return {
        schema.SIM_STRAGGLER: (sim.straggler, {
            "rows_max": float(rows.max()), "rows_mean": float(rows.mean()),
            "assignments_max": float(assign.max()), "assignments_mean": float(assign.mean()),
            "compute_straggler": sim.compute_straggler,
        }),
        schema.SIM_DEVICES_PER_TOKEN: (sim.devices_per_token, {
            "devices_per_token_max": float(sim.devices_per_token_max)
        }),
        schema.SIM_NODES_PER_TOKEN: (sim.nodes_per_token, {
            "nodes_per_token_max": float(sim.nodes_per_token_max)
        }),
        schema.SIM_BYTES_PER_TOKEN: (sim.bytes_per_token, {
            "dispatch_bytes_per_token": sim.dispatch_bytes / sim.num_tokens,
            "combine_bytes_per_token": sim.combine_bytes / sim.num_tokens,
            "dispatch_rank_bytes_mean": float(per_rank[:2].sum(0).mean()),
            **{f"dispatch_busiest_{part}_bytes": float(per_rank[i, busiest])
               for i, part in enumerate(("sent_intra", "sent_inter", "recv_intra", "recv_inter"))},
        }),
        schema.SIM_A2A_US: (sim.a2a_us, {
            "dispatch_us": sim.dispatch_us, "combine_us": sim.combine_us
        }),
        schema.SIM_STEP_US: (sim.step_us, {
            "compute_us": sim.compute_us, "comm_us": sim.a2a_us
        }),
    }  # fmt: skip


def log_results(recorder: Recorder, results: list[Result], ranks_per_node: int) -> None:
    """One row per (ranks, rule, placement) and metric: the mean over steps and layers."""
    groups: dict[tuple[int, str, str], list[Result]] = defaultdict(list)
    for r in results:
        groups[r.ranks, r.rule, r.placement].append(r)
    for (P, rule, placement), found in groups.items():
        where = {"ranks": P, "nodes": P // ranks_per_node, "rule": rule, "placement": placement}
        if found[0].sim is None:
            recorder.log(schema.SIM_SKIPPED, 1.0, reason=found[0].skipped, **where)
            continue
        per_step = [step_values(r.sim) for r in found]
        for metric in per_step[0]:
            values = np.array([v[metric][0] for v in per_step])
            columns = {
                name: float(np.mean([v[metric][1][name] for v in per_step]))
                for name in per_step[0][metric][1]
            }
            recorder.log(
                metric, float(values.mean()), min=float(values.min()),
                max=float(values.max()), samples=len(values), **columns, **where,
            )  # fmt: skip


def run(job: Job, recorder: Recorder) -> None:
    task: EPSimConfig = job.task
    if task.source == "trace":
        path = trace_path(task)
        if not path.is_file():
            raise ValueError(f"task.trace={task.trace!r}: no trace at {path}")
        trace = load_trace(path)
    else:
        trace = untrained_trace(job)
    sizes = Sizes(task.d_model, task.expert_hidden, task.x_bytes)
    rules = [Rule.parse(text) for text in task.rules]
    for P in task.ranks:
        layout = Layout(P, task.ranks_per_node, task.tokens_per_rank, task.redundant_per_rank)
        found = list(
            replay(trace, layout, rules, list(task.placements), sizes, task.machine(), job.seed)
        )
        log_results(recorder, found, task.ranks_per_node)
        recorder.flush()
        log.info(
            "ep_sim %s: %d ranks done (%d replayed steps x layers)", task.source, P, len(found)
        )


METRICS = (
    schema.SIM_STRAGGLER, schema.SIM_DEVICES_PER_TOKEN, schema.SIM_NODES_PER_TOKEN,
    schema.SIM_BYTES_PER_TOKEN, schema.SIM_A2A_US, schema.SIM_STEP_US, schema.SIM_SKIPPED,
)  # fmt: skip


def summary(rows: list[dict[str, Any]]) -> str | None:
    """'straggler 1.23 at 1024 ranks (topk, contiguous)': the largest layout's first row."""
    found = [r for r in rows if r.get("metric") == schema.SIM_STRAGGLER.name]
    if not found:
        return None
    last = max(found, key=lambda r: r["ranks"])
    where = f"{last['ranks']} ranks ({last['rule']}, {last['placement']})"
    return f"straggler {last['value']:.2f} at {where}"


TASK = Task(
    name="ep_sim",
    config=EPSimConfig,
    run=run,
    metrics=METRICS,
    summary=summary,
    # no leaderboard question: its rows are per layout, drawn in the simulated-scale figures
    report=Asks(order=6),
)
