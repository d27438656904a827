"""convergence: train a tiny byte-level LM whose FFNs are the variant under test.

Shape legend: B sequences, S sequence length, V byte vocabulary, E routed experts, A kept
assignments, N validation windows, M corpus domains (prose, code).

Model: `moe_bench.lm.TinyLM` of width `model.d_model` with `task.n_layers` blocks; every
`task.moe_every`-th FFN is the variant, sized by iso-compute from the `model` group (so the
dense variant is the baseline at equal active FLOPs per token), the others dense of that width.
Data: `moe_bench.data` (the embedded CPython docs and stdlib sources, or data.path).

Training follows the DeepSeek-V3 recipe at toy scale (DeepSeek-AI 2024, arXiv:2412.19437,
Sec. 4.2): AdamW with betas (0.9, 0.95) and weight decay on matrices only (GPT-2/nanoGPT:
norm gains are not decayed), linear warm-up over `task.warmup_steps`, then cosine decay to
MIN_LR_RATIO of `task.lr` (Hoffmann et al. 2022 decay to 10%), gradient-norm clipping, objective
= LM loss + the layers' aux losses, and `update_bias()` after every optimizer step (loss-free
balancing, Wang et al. 2024, arXiv:2408.15664, Alg. 1). Weights stay float32; a run `dtype`
of bfloat16 trains under `torch.autocast` with that dtype (the GPU preset uses it). float16
would need loss scaling and is refused. Seeds: `seed` sets the initialisation and the global
RNG (random second choices, router noise), and a generator of its own draws the batches.

Rows (docs/contract.md, section 5), `step` = optimizer steps taken:
- training, every step (the mean over the last `log_every` steps when that is larger):
  `train_loss` (LM cross-entropy, nats/byte), `aux_loss` (weighted, summed over layers; column
  `loss` = the loss's name, e.g. balance or z, or `total` for their sum), `tokens_per_s`
  (unit tok/s, pass fwd_bwd: forward, backward, optimizer step and bias update), and per MoE
  layer (column `layer`, plus `layer="mean"`): `load_entropy`, `max_vio_batch`, `drop_fraction`.
- evaluation, at step 0, every `eval_every` steps and at the end, over the fixed validation set
  (`eval_batches` batches of `batch_size` windows): `val_loss` (nats/byte; column
  `unigram_entropy`, the loss of the best context-free byte model, for reference), `val_ppl`
  (per byte), `max_vio_global` per layer and mean (loads summed over the whole set), and
  `expert_load`: per layer, expert and domain, the expert's share of that domain's kept
  assignments (unit `share`, sums to 1 over experts), the expert-specialisation matrix.
Every row carries `model_params_total` and `model_params_active` (the whole LM; routed experts
count top_k/E of their weights), beside the runner's per-layer `params_total`/`params_active`.

A non-finite loss stops the job: that step's rows are logged, then FloatingPointError names the
step and gives every layer's routing statistics; the runner records the job as failed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from moe_bench import causes, data, loggers, schema, upcycle
from moe_bench.config import Job, TaskConfig
from moe_bench.isocompute import BACKWARD_FACTOR, count_params, ffn_flops_per_token
from moe_bench.lm import LMConfig, TinyLM, build_lm
from moe_bench.progress import Rows, find_row
from moe_bench.recorder import Recorder
from moe_bench.task import Answer, Asks, Task
from moe_bench.timing import synchronize
from moe_bench.trace_recorder import TraceRecorder
from moe_bench.training import TrainLog, divergence, evaluate, log_eval, train_forward
from variants.contract.config import check_divides, check_int, check_number


@dataclass
class ConvergenceConfig(TaskConfig):
    name: str = "convergence"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int = 30
    eval_every: int = 100
    eval_batches: int = 8
    n_layers: int = 4
    n_heads: int = 4
    moe_every: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    log_every: int = 1  # training rows: the mean over this many steps
    # gradient accumulation: each optimizer step runs batch_size / micro_batch_size forwards
    # (null: one); micro and global batches then differ (balance_scope=global_batch)
    micro_batch_size: int | None = None
    # start from a dense run's checkpoint and save this one's (moe_bench/upcycle.py)
    init_from: str | None = None  # job folder of a dense run that ran with save=true
    upcycle: str = "copy"  # copy | granular: how routed experts are filled from its FFN
    upcycle_noise: float = 0.0  # multiplicative noise on the copied expert weights
    save: bool = False  # write the final model to <job folder>/model.pt
    # causes of the MoE-vs-dense gap (moe_bench/causes.py); speed options, opt-in because they
    # round differently from the default path (scripts/train_speed.py)
    router_init_scale: float | None = None  # Switch Sec. 2.4's s; null: the router's own init
    eval_capacity: bool = True  # false: evaluation without capacity (drops in training only)
    fused_optimizer: bool = False  # AdamW's fused kernel: losses agree to ~1e-7
    compile: bool = False  # torch.compile the LM's training forward
    # routing trace of every trace_every-th step (0: none): moe_bench/trace_recorder.py
    trace_every: int = 0
    trace_layers: list[int] | None = None
    trace_router: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
            check_int(self, name, 1)
        for name in ("n_layers", "n_heads", "moe_every"):
            check_int(self, name, 1)
        check_int(self, "warmup_steps", 0)
        check_int(self, "trace_every", 0)
        check_number(self, "lr", positive=True)
        check_number(self, "grad_clip", positive=True)
        check_number(self, "weight_decay", minimum=0)
        if self.micro_batch_size is not None:
            check_int(self, "micro_batch_size", 1)
            check_divides(self, "micro_batch_size", "batch_size")
        upcycle.check_fields(self)
        if self.router_init_scale is not None:
            check_number(self, "router_init_scale", positive=True)


BETAS = (0.9, 0.95)  # DeepSeek-V3 Sec. 4.2, as GPT-3
MIN_LR_RATIO = 0.1  # cosine decays to 10% of the peak learning rate


def build_model(job: Job) -> TinyLM:
    """The seeded LM of the job: its variant in the MoE blocks, float32 weights on the device."""
    task: ConvergenceConfig = job.task
    if not job.component.trains:
        raise ValueError(
            f"variant={job.variant!r} is a {job.component.origin} component measured by "
            "throughput and memory; task=convergence trains the suite's own variants only"
        )
    try:
        cfg = LMConfig(
            d_model=job.model.d_model,
            n_layers=task.n_layers,
            n_heads=task.n_heads,
            seq_len=task.seq_len,
            moe_every=task.moe_every,
            checkpoint=job.model.checkpoint,
        )
    except ValueError as e:
        raise ValueError(f"convergence model (model.d_model and task.*): {e}") from None
    if not task.eval_capacity:
        causes.check_dropless_eval(job.layer, job.variant)
    torch.manual_seed(job.seed)
    lm = build_lm(job.variant, dataclasses.asdict(job.layer), cfg)
    if task.router_init_scale is not None:
        causes.init_routers(lm, task.router_init_scale, job.seed)
    return lm.to(job.device)


def model_params(lm: TinyLM) -> tuple[int, int]:
    """(total, active per token) parameters of the whole LM."""
    total = sum(p.numel() for p in lm.parameters())
    inactive = 0
    for block in lm.blocks:
        ffn_total, ffn_active = count_params(block.ffn)
        inactive += ffn_total - ffn_active
    return total, total - inactive


def make_optimizer(lm: TinyLM, task: ConvergenceConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and expert banks (dim >= 2), not on norm gains."""
    params = [p for p in lm.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": task.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=task.lr, betas=BETAS, fused=task.fused_optimizer or None)


def lr_factor(step: int, warmup_steps: int, steps: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(job: Job) -> Callable[[], AbstractContextManager]:
    """A fresh autocast context per use: none for float32, bfloat16 autocast for bfloat16."""
    if job.dtype == torch.float32:
        return nullcontext
    if job.dtype != torch.bfloat16:
        raise ValueError(
            f"dtype={str(job.dtype).removeprefix('torch.')!r} is not supported by "
            "task=convergence: use float32, or bfloat16 (autocast; float16 needs loss scaling)"
        )
    return lambda: torch.autocast(job.device.type, dtype=torch.bfloat16)


def run(job: Job, recorder: Recorder) -> None:
    task: ConvergenceConfig = job.task
    ctx = autocast(job)
    corpus = data.load(job.data)
    generator = torch.Generator().manual_seed(job.seed)
    batches = corpus.batches("train", task.batch_size, task.seq_len, generator)
    val = corpus.val_windows(task.seq_len, task.eval_batches * task.batch_size)
    unigram = corpus.unigram_entropy("val").nats
    lm = build_model(job).train()
    if task.init_from is not None:
        upcycle.upcycle(lm, task, job.seed)
    total, active = model_params(lm)
    loggers.attach(job.logger, recorder)  # live curves (logger=tensorboard|wandb), if asked

    def log(metric: str | schema.Metric, value: float, **columns: Any) -> None:
        recorder.log(metric, value, model_params_total=total, model_params_active=active, **columns)

    optimizer = make_optimizer(lm, task)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, task.warmup_steps, task.steps)
    )
    train_log = TrainLog(log, task.log_every, task.batch_size * task.seq_len, job.layer.variable_k)
    micro = task.micro_batch_size or task.batch_size

    def eval_now() -> tuple[float, dict[int, torch.Tensor]]:
        with causes.dropless(lm, not task.eval_capacity):
            return evaluate(lm, val, task.batch_size, ctx, job.device)

    tracer = TraceRecorder.for_job(lm, job)
    model = torch.compile(lm) if task.compile else lm
    log_eval(log, 0, 0.0, *eval_now(), unigram)
    for step in tqdm(range(1, task.steps + 1), desc="train", leave=False, disable=None):
        idx_BS, targets_BS, domain_B = (t.to(job.device) for t in next(batches))
        synchronize(job.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with tracer.capture(step):
            out, finite = train_forward(model, idx_BS, targets_BS, micro, ctx)
        if finite:
            torch.nn.utils.clip_grad_norm_(lm.parameters(), task.grad_clip)
            optimizer.step()
            schedule.step()
            lm.update_bias()
        synchronize(job.device)
        stats = train_log.add(out, time.perf_counter() - start)
        tracer.record(step, out, idx_BS, domain_B)
        if not finite:
            train_log.emit(step, force=True)
            recorder.flush()
            raise FloatingPointError(divergence(step, out, stats))
        train_log.emit(step, force=step == task.steps)
        if step % task.eval_every == 0 or step == task.steps:
            val_loss, loads = eval_now()
            log_eval(log, step, train_log.wall_s, val_loss, loads, unigram)
            recorder.flush()
    if task.save:
        upcycle.save_checkpoint(lm, job.variant, job.layer, task.steps, recorder.out_dir)
    tracer.save(recorder.out_dir)


def cost_tflop(job: Job) -> float:
    """Training steps of every block's FFN (each has the layer's active FLOPs)."""
    task: ConvergenceConfig = job.task
    tokens = task.steps * task.batch_size * task.seq_len * task.n_layers * (1 + BACKWARD_FACTOR)
    return ffn_flops_per_token(job.layer) * tokens / 1e12


def summary(rows: Rows) -> str | None:
    """'val_loss 3.1416 at step 300'."""
    val = find_row(rows, "val_loss")
    return None if val is None else f"val_loss {val['value']:.4f} at step {val['step']}"


METRICS = (
        schema.TRAIN_LOSS, schema.AUX_LOSS, schema.TOKENS_PER_S, schema.LOAD_ENTROPY,
        schema.MAX_VIO_BATCH, schema.DROP_FRACTION, schema.EXPERTS_PER_TOKEN, schema.VAL_LOSS,
        schema.VAL_PPL, schema.MAX_VIO_GLOBAL, schema.EXPERT_LOAD,
    )  # fmt: skip
TASK = Task(
    name="convergence",
    config=ConvergenceConfig,
    run=run,
    metrics=METRICS,
    cost_tflop=cost_tflop,
    summary=summary,
    timed=True,
    report=Asks(
        order=3,
        ask="How well and how fast does a small LM train with the layer?",
        measure=(
            "Measure: final validation loss of a small byte-level LM trained with each layer, "
            "in nats and in bits per byte (bits = nats / ln 2), lower is better; tokens/s is "
            "the mean over the run's logged training steps (forward, backward, optimizer); "
            "balance columns are after training. Baseline: the dense row (same active FLOPs)."
        ),
        answers=(
            Answer("most balanced after training", schema.MAX_VIO_GLOBAL, "MaxVio_global"),
            Answer("best quality", schema.VAL_LOSS, "validation bits per byte", unit="bits/byte"),
        ),
    ),
)
