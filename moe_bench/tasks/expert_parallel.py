"""expert_parallel: a token-choice layer run expert-parallel over `task.ep_size` ranks.

Shape legend: P ranks (task.ep_size), B sequences of the global batch, S sequence length,
D model width, E routed experts, L = E/P experts per rank.

The job's `model.tokens` tokens are the global batch: B = tokens / seq_len sequences, split
over the P ranks by sequence (a sequence lives on one rank, so DeepSeek-V2's per-sequence
losses are the paper's, arXiv:2405.04434 Sec. 2.1.3-2.1.4 / 2.2). Every rank builds the same
layer (same seed) and wraps it in `variants.parallel.expert_parallel.ExpertParallel`.

Ranks: `task.launcher=spawn` starts P processes on this machine (`spawn_ranks`); `env` joins
ranks started by a cluster launcher (torchrun, Slurm/submitit with tasks_per_node=P) through
`init_from_env`. Either way every rank sends its numbers to rank 0 through the process group
(`all_gather_object`) and rank 0 writes the job's rows; a rank that fails fails the job with
its error (`RankFailed`) within `task.timeout_s`.

Rows (docs/contract.md §5, §7), layer 0 and "mean" (one layer: the same values):
- traffic of an eval forward of the global batch (exact, from the count exchange):
  `devices_per_token` (column `devices_per_token_max`), `bytes_per_token` (columns
  `dispatch_bytes`, `combine_bytes`), `remote_fraction`, `rank_imbalance` (phase "eval");
- `a2a_ms`: forward dispatch + combine, median over repeats of the slowest rank (columns
  `route_ms`, `dispatch_ms`, `expert_ms`, `combine_ms` the same way);
- `rank_tokens`: one row per (src, dst), value = token rows rank src sends to rank dst,
  column `assignments` = the kept assignments among them (their sum is T x K when dropless);
- per pass (`fwd`, `fwd_bwd`): `tokens_per_s` of the EP step (the slowest rank's time, all
  P ranks' tokens; columns `ep_ms`, `ep1_ms`, `ep1_tokens_per_s`) and `speedup_vs_ep1`: the
  unsharded layer on one rank (rank 0, the same tokens, timed in the same job) over the EP step;
- short training run (`task.steps` Adam steps, train mode, every rank its own skewed batch):
  `rank_imbalance` per step (phase "train"), to see a balance loss act on received-token
  imbalance, e.g. DeepSeek-V2's communication-balance loss (alpha3 0 vs the paper's 0.02,
  arXiv:2405.04434 Sec. 2.1.4, Eq. 17-19). The inputs lean toward rank 0's experts
  (`task.skew` times their unit centroid plus N(0, 1)), so training starts imbalanced; the
  loss is the MSE to a fixed random linear teacher plus the layer's aux loss.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_bench import components, loggers, schema
from moe_bench.config import Job, ModelConfig, TaskConfig
from moe_bench.launch import init_from_env, spawn_ranks
from moe_bench.recorder import Recorder
from moe_bench.task import Asks, Task
from moe_bench.tasks import STEPS
from moe_bench.timing import time_steps
from variants import MoEConfig
from variants.contract.config import check_choice, check_int, check_number
from variants.parallel.expert_parallel import (
    LOCAL_BACKENDS,
    EPPlan,
    EPStats,
    ExpertParallel,
    _check_groups,
    check_shardable,
)

PASSES = ("fwd", "fwd_bwd")
PARTS = ("route_ms", "dispatch_ms", "expert_ms", "combine_ms")
DIST_BACKENDS = ("auto", "gloo", "nccl")
LAUNCHERS = ("spawn", "env")


@dataclass
class ExpertParallelConfig(TaskConfig):
    """task=expert_parallel (docs/expert_parallel.md).

    `dist_backend` is torch.distributed's collective backend; the top-level `backend` stays the
    expert compute of each rank's local experts (a name of its own: the two were once both
    `backend`, one top-level and one under task).
    """

    name: str = "expert_parallel"
    ep_size: int = 2  # P ranks; model.tokens is the global batch, split over them by sequence
    warmup: int = 2  # untimed forwards first
    repeats: int = 5  # timed steps; medians over them
    steps: int = 20  # short training run: rank_imbalance per step (comm-balance loss at work)
    lr: float = 1e-2  # Adam, for the training run
    skew: float = 2.0  # training inputs: skew * (unit centroid of rank 0's experts) + N(0, 1)
    dist_backend: str = "auto"  # collectives: auto = gloo on CPU, nccl on CUDA
    launcher: str = "spawn"  # spawn: the job starts its ranks; env: ranks from a launcher
    timeout_s: float = 600.0  # the whole rank job, and each collective

    def __post_init__(self) -> None:
        check_int(self, "ep_size", 1)
        check_int(self, "warmup", 0)
        check_int(self, "repeats", 1)
        check_int(self, "steps", 0)
        check_number(self, "lr", positive=True)
        check_number(self, "skew", minimum=0)
        check_number(self, "timeout_s", positive=True)
        check_choice(self, "dist_backend", DIST_BACKENDS)
        check_choice(self, "launcher", LAUNCHERS)


@dataclass(frozen=True)
class RankSpec:
    """What each rank needs from the Job, picklable (spawned ranks receive it)."""

    variant: str
    layer: MoEConfig
    model: ModelConfig
    task: ExpertParallelConfig
    seed: int
    dtype: torch.dtype
    device: str  # "cpu" or "cuda" (each rank its own GPU under nccl)
    backend: str  # local expert backend (grouped or loop)

    @property
    def sequences(self) -> int:
        return self.model.tokens // self.model.seq_len


def collective_backend(task: ExpertParallelConfig, device: torch.device) -> str:
    """gloo on CPU, nccl on CUDA for `auto`; a mismatch is refused before any rank starts."""
    backend = task.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if (backend == "nccl") != (device.type == "cuda"):
        raise ValueError(
            f"task.dist_backend={task.dist_backend!r} with device {device.type}: nccl needs "
            "CUDA tensors and gloo runs here on CPU (use task.dist_backend=auto)"
        )
    return backend


def rank_spec(job: Job) -> RankSpec:
    """The picklable spec, after every check that can fail before ranks start."""
    task: ExpertParallelConfig = job.task
    P, m = task.ep_size, job.model
    if job.component.origin != "variants" or job.component.is_dense:
        raise ValueError(
            f"variant={job.variant!r} has no routed experts of this library to shard "
            "(task=expert_parallel takes the token-choice variants)"
        )
    if job.backend not in LOCAL_BACKENDS:
        raise ValueError(
            f"backend={job.backend!r}: expert parallelism runs the local experts on "
            f"{' or '.join(LOCAL_BACKENDS)}"
        )
    # the wrapper's own checks (a forward of its own, not token-choice, ...), on the meta
    # device: no weights allocated
    check_shardable(
        components.lookup(job.variant).build(job.layer, torch.device("meta"), job.dtype)
    )
    EPPlan(job.layer.num_experts, P, 0, job.backend)  # E divisible by P
    _check_groups(job.layer, P)  # device groups on whole ranks
    if (m.tokens // m.seq_len) % P:
        raise ValueError(
            f"model.tokens={m.tokens} / model.seq_len={m.seq_len} = {m.tokens // m.seq_len} "
            f"sequences must be divisible by task.ep_size={P} (a sequence lives on one rank)"
        )
    return RankSpec(
        job.variant, job.layer, m, task, job.seed, job.dtype, job.device.type, job.backend
    )


# --- on every rank --------------------------------------------------------------------------


def _device(spec: RankSpec) -> torch.device:
    if spec.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def global_batch(spec: RankSpec, device: torch.device) -> torch.Tensor:
    """x_BSD ~ N(0, 1), the same on every rank (seeded); rank r takes its block of sequences."""
    m = spec.model
    generator = torch.Generator().manual_seed(spec.seed)
    x_BSD = torch.randn(spec.sequences, m.seq_len, m.d_model, generator=generator)
    return x_BSD.to(device, spec.dtype)


def local_block(x_BSD: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per_rank = x_BSD.shape[0] // world
    return x_BSD[rank * per_rank : (rank + 1) * per_rank]


def _ep_step(ep: ExpertParallel, x: torch.Tensor, pass_: str):
    """One EP step: eval forward without autograd, or a training forward and backward."""
    grad_y = torch.randn_like(x)

    def fwd() -> None:
        ep.eval()
        with torch.no_grad():
            ep(x)

    def fwd_bwd() -> None:
        ep.train()
        ep.zero_grad(set_to_none=True)
        out = ep(x.detach().requires_grad_(True))
        ((out.y * grad_y).sum() + out.aux_loss).backward()

    return fwd if pass_ == "fwd" else fwd_bwd


def measure(ep: ExpertParallel, x: torch.Tensor, task: ExpertParallelConfig) -> dict[str, Any]:
    """This rank's step times per pass (after a barrier, so ranks start together) and the
    time split of its eval forwards."""
    device = x.device
    times: dict[str, list[float]] = {}
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    for pass_ in PASSES:
        step = _ep_step(ep, x, pass_)
        for _ in range(task.warmup):
            step()
        times[pass_] = []
        for _ in range(task.repeats):
            dist.barrier()
            t0 = _now(device)
            step()
            times[pass_].append(1e3 * (_now(device) - t0))
            if pass_ == "fwd":
                for name in PARTS:
                    parts[name].append(getattr(ep.stats, name))
    return {"times": times, "parts": parts}


def eval_traffic(ep: ExpertParallel, x: torch.Tensor) -> EPStats:
    """Traffic of one eval forward (deterministic routing, no training-only drops)."""
    ep.eval()
    with torch.no_grad():
        ep(x)
    return ep.stats


def reference_ms(
    layer: torch.nn.Module, x_BSD: torch.Tensor, task: ExpertParallelConfig
) -> dict[str, float]:
    """The unsharded layer on all tokens, on this rank alone (the ep_size=1 baseline)."""
    device = x_BSD.device
    return {
        pass_: time_steps(STEPS[pass_](layer, x_BSD), device, task.warmup, task.repeats, pass_)
        .median_ms
        for pass_ in PASSES
    }  # fmt: skip


def train_imbalance(ep: ExpertParallel, spec: RankSpec, rank: int, world: int) -> list[float]:
    """rank_imbalance per step of a short training run on skewed inputs (module docstring)."""
    task, m = spec.task, spec.model
    device = next(ep.parameters()).device
    router_ED = ep.router.weight.detach().float().cpu()
    u_D = router_ED[: ep.plan.per_rank].mean(0)  # toward rank 0's experts (same on all ranks)
    u_D = u_D / u_D.norm().clamp_min(1e-12)
    teacher_DD = (
        torch.randn(m.d_model, m.d_model, generator=torch.Generator().manual_seed(spec.seed + 1))
        / m.d_model**0.5
    )
    teacher_DD = teacher_DD.to(device, spec.dtype)
    generator = torch.Generator().manual_seed(spec.seed + 2 + rank)
    shape = (spec.sequences // world, m.seq_len, m.d_model)
    load_count = getattr(ep.router, "load_count", None)
    if load_count is not None:
        load_count.zero_()  # the timing steps counted load; the run starts from none
    opt = torch.optim.Adam(ep.parameters(), lr=task.lr)
    ep.train()
    imbalance = []
    for _ in range(task.steps):
        x = (task.skew * u_D + torch.randn(shape, generator=generator)).to(device, spec.dtype)
        out = ep(x)
        loss = F.mse_loss(out.y.float(), (x @ teacher_DD).float()) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ep.sync_replicated_grads()
        opt.step()
        ep.update_bias()  # deepseek_v3: from the load of all ranks; otherwise a no-op
        imbalance.append(ep.stats.rank_imbalance)
    return imbalance


def rank_main(rank: int, world: int, spec: RankSpec) -> dict[str, Any] | None:
    """Everything one rank does; rank 0 returns the job's numbers, the others None."""
    device = _device(spec)
    torch.manual_seed(spec.seed)
    layer = components.lookup(spec.variant).build(spec.layer, device, spec.dtype)
    x_BSD = global_batch(spec, device)
    x_local = local_block(x_BSD, rank, world)
    ep = ExpertParallel(layer, backend=spec.backend)
    mine = measure(ep, x_local, spec.task)
    stats = eval_traffic(ep, x_local)
    ref = reference_ms(layer, x_BSD, spec.task) if rank == 0 else None
    del layer  # rank 0 timed the unsharded layer; EP holds what it needs
    mine["train"] = train_imbalance(ep, spec, rank, world)
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    if rank != 0:
        return None
    return summarize(every, stats, ref, tokens=spec.sequences * spec.model.seq_len)


def summarize(every: list[dict], stats: EPStats, ref: dict[str, float], tokens: int) -> dict:
    """Per repeat the slowest rank's time (an all-to-all step ends with its last rank), then
    the median over repeats."""

    def slowest(key: str, name: str) -> float:
        per_repeat = zip(*(rank_numbers[key][name] for rank_numbers in every))
        return statistics.median(max(values) for values in per_repeat)

    return {
        "stats": stats,
        "ep_ms": {p: slowest("times", p) for p in PASSES},
        "parts": {name: slowest("parts", name) for name in PARTS},
        "ref_ms": ref,
        "train": every[0]["train"],
        "tokens": tokens,
    }


# --- the job --------------------------------------------------------------------------------


def log_rows(recorder: Recorder, numbers: dict[str, Any]) -> None:
    stats: EPStats = numbers["stats"]
    parts = numbers["parts"]
    for layer in (0, "mean"):
        recorder.log(
            schema.DEVICES_PER_TOKEN,
            stats.devices_per_token,
            devices_per_token_max=stats.devices_per_token_max,
            layer=layer,
        )
        recorder.log(
            schema.BYTES_PER_TOKEN,
            stats.bytes_per_token,
            dispatch_bytes=stats.dispatch_bytes,
            combine_bytes=stats.combine_bytes,
            layer=layer,
        )
        recorder.log(schema.REMOTE_FRACTION, stats.remote_fraction, layer=layer)
        recorder.log(schema.RANK_IMBALANCE, stats.rank_imbalance, phase="eval", layer=layer)
        a2a = parts["dispatch_ms"] + parts["combine_ms"]
        recorder.log(schema.A2A_MS, a2a, **parts, layer=layer)
    P = stats.world_size
    for src in range(P):
        for dst in range(P):
            recorder.log(
                schema.RANK_TOKENS,
                int(stats.rank_tokens[src, dst]),
                assignments=int(stats.rank_assignments[src, dst]),
                src=src,
                dst=dst,
                layer=0,
            )
    tokens = numbers["tokens"]
    for pass_ in PASSES:
        ep_ms, ep1_ms = numbers["ep_ms"][pass_], numbers["ref_ms"][pass_]
        recorder.log(
            schema.TOKENS_PER_S,
            tokens / ep_ms * 1e3,
            ep_ms=ep_ms,
            ep1_ms=ep1_ms,
            ep1_tokens_per_s=tokens / ep1_ms * 1e3,
            **{"pass": pass_},
        )
        recorder.log(schema.SPEEDUP_VS_EP1, ep1_ms / ep_ms, **{"pass": pass_})
    for step, value in enumerate(numbers["train"]):
        recorder.log(schema.RANK_IMBALANCE, value, step=step, phase="train", layer=0)


def export_slurm_env() -> None:
    """Under Slurm (Hydra's submitit launcher with tasks_per_node=P) nothing sets MASTER_ADDR:
    derive torch's env:// variables from the Slurm job with submitit's helper. Each rank keeps
    every GPU visible and takes GPU LOCAL_RANK (init_from_env)."""
    if "SLURM_JOB_ID" not in os.environ or "MASTER_ADDR" in os.environ:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # init_from_env then names the missing variable
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _from_env(spec: RankSpec, backend: str, recorder: Recorder) -> dict[str, Any] | None:
    """This process is one rank of a launcher's job; ranks other than 0 write no rows."""
    task = spec.task
    export_slurm_env()
    rank, world = init_from_env(backend, timeout_s=task.timeout_s)
    if rank != 0:  # its runner still finishes the job: keep its file apart from rank 0's rows
        recorder.prefix = f"rows.rank{rank}"
    try:
        if world != task.ep_size:
            raise ValueError(
                f"task.ep_size={task.ep_size} but the launcher started {world} ranks "
                "(set hydra.launcher.tasks_per_node, or torchrun's --nproc-per-node, to ep_size)"
            )
        numbers = rank_main(rank, world, spec)
    finally:
        dist.destroy_process_group()
    return numbers


def run(job: Job, recorder: Recorder) -> None:
    task: ExpertParallelConfig = job.task
    spec = rank_spec(job)
    backend = collective_backend(task, job.device)
    loggers.attach(job.logger, recorder)  # live curves (logger=tensorboard|wandb), if asked
    if task.launcher == "env":
        numbers = _from_env(spec, backend, recorder)
    else:
        if backend == "nccl" and task.ep_size > torch.cuda.device_count():
            raise ValueError(
                f"task.ep_size={task.ep_size} nccl ranks need as many GPUs, this machine has "
                f"{torch.cuda.device_count()} (use task.launcher=env across nodes)"
            )
        numbers = spawn_ranks(
            rank_main,
            task.ep_size,
            args=(spec,),
            backend=backend,
            timeout_s=task.timeout_s,
            threads=job.threads or 1,
        )[0]
    if numbers is not None:
        log_rows(recorder, numbers)
    recorder.flush()


METRICS = (
        schema.DEVICES_PER_TOKEN, schema.BYTES_PER_TOKEN, schema.REMOTE_FRACTION,
        schema.RANK_IMBALANCE, schema.A2A_MS, schema.RANK_TOKENS, schema.TOKENS_PER_S,
        schema.SPEEDUP_VS_EP1,
    )  # fmt: skip
TASK = Task(
    name="expert_parallel",
    config=ExpertParallelConfig,
    run=run,
    metrics=METRICS,
    # after the tasks the report orders by name; no leaderboard question of its own: its
    # traffic columns join the leaderboard, and its section is the expert-parallel figures
    report=Asks(order=4),
)
