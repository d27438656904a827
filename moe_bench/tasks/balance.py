"""balance: how an untrained layer spreads real and adversarial tokens over its experts.

Shape legend: B sequences, S sequence length, D model width, V byte vocabulary, E experts.

Inputs (column `domain`), each `task.batches` forwards of `model.tokens` tokens, eval mode:
- one domain per corpus domain (`moe_bench.data`: CPython's docs as prose, its standard
  library as code, or the user's files): consecutive byte windows embedded with a fixed random
  table `emb_VD ~ N(0, 1)`, so byte frequencies and co-occurrence are those of real text.
- `skewed`: `skew * u + N(0, 1)` with `u` the unit centroid of expert 0: every token leans
  toward one expert, the adversarial case for a router without a trained balance. (Dense has
  one "expert" and no router: its statistics are those of perfect balance.)
Rows per domain (layer 0): the docs/contract.md §4 statistics over the whole window (`max_vio` as
`max_vio_global`), `max_vio_batch` per forward (`step` = batch index) and `expert_load`, each
expert's share of the kept assignments (column `expert`).
"""

from __future__ import annotations

import torch

from moe_bench import data, schema
from moe_bench.config import BalanceConfig, Job
from moe_bench.metrics import max_vio, window_stats
from moe_bench.recorder import Recorder
from moe_bench.tasks import build_layer
from variants.routing import experts_per_token


def text_batches(job: Job) -> dict[str, list[torch.Tensor]]:
    """Per corpus domain, up to task.batches batches x_BSD of consecutive embedded bytes."""
    task: BalanceConfig = job.task
    m = job.model
    split = data.load(job.data).split("train")
    generator = torch.Generator().manual_seed(job.seed)
    emb_VD = torch.randn(256, m.d_model, generator=generator)
    batches = {}
    for domain, (start, end) in zip(data.DOMAINS, split.bounds):
        n = min(end - start, task.batches * m.tokens) // m.tokens
        if n == 0:
            raise ValueError(
                f"domain {domain!r} of the corpus holds {end - start} bytes, fewer than "
                f"model.tokens={m.tokens}; use more text or fewer tokens"
            )
        idx_NBS = split.data_N[start : start + n * m.tokens].long().view(n, -1, m.seq_len)
        batches[domain] = [emb_VD[idx_BS].to(job.device, job.dtype) for idx_BS in idx_NBS]
    return batches


def skewed_batches(job: Job, centroid_D: torch.Tensor | None) -> list[torch.Tensor]:
    """Tokens leaning toward `centroid_D` (expert 0's; a random direction where no router)."""
    task: BalanceConfig = job.task
    m = job.model
    generator = torch.Generator().manual_seed(job.seed + 1)
    if centroid_D is None:
        u_D = torch.randn(m.d_model, generator=generator)
    else:
        u_D = centroid_D.detach().float().cpu()
    u_D = u_D / u_D.norm()
    shape = (m.tokens // m.seq_len, m.seq_len, m.d_model)
    return [
        (task.skew * u_D + torch.randn(shape, generator=generator)).to(job.device, job.dtype)
        for _ in range(task.batches)
    ]


def run(job: Job, recorder: Recorder) -> None:
    layer = build_layer(job).eval()
    centroid_D = None if job.component.is_dense else layer.router.centroid(0)
    inputs = {**text_batches(job), "skewed": skewed_batches(job, centroid_D)}
    with torch.no_grad():
        for domain, batches in inputs.items():
            routings = [layer(x_BSD).routing for x_BSD in batches]
            for step, routing in enumerate(routings):
                recorder.log(
                    schema.MAX_VIO_BATCH, max_vio(routing.load), step=step, domain=domain, layer=0
                )
            stats = window_stats(routings)
            stats[schema.MAX_VIO_GLOBAL.name] = stats.pop("max_vio")
            for metric, value in stats.items():
                recorder.log(metric, value, domain=domain, layer=0)
            if job.layer.variable_k:  # mean (min, max) kept routed experts over the window
                k_T = torch.cat([experts_per_token(r).cpu() for r in routings]).double()
                recorder.log(
                    schema.EXPERTS_PER_TOKEN, float(k_T.mean()), domain=domain, layer=0,
                    min=float(k_T.min()), max=float(k_T.max()),
                )  # fmt: skip
            load_E = sum(r.load.cpu() for r in routings).double()
            for expert, share in enumerate((load_E / load_E.sum()).tolist()):
                recorder.log(schema.EXPERT_LOAD, share, domain=domain, layer=0, expert=expert)
    recorder.flush()
