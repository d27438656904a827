"""balance: how an untrained layer spreads real and adversarial tokens over its experts.

Shape legend: B sequences, S sequence length, D model width, V byte vocabulary, E experts.

Inputs (column `domain`), each `task.batches` forwards of `model.tokens` tokens, eval mode:
- one domain per corpus domain (`moe_bench.data`: CPython's docs as prose, its standard
  library as code, or the user's files): consecutive byte windows embedded with a fixed random
  table `emb_VD ~ N(0, 1)`, so byte frequencies and co-occurrence are those of real text.
- `skewed`: `skew * u + N(0, 1)` with `u` the unit centroid of expert 0: every token leans
  toward one expert, the adversarial case for a router without a trained balance. (Dense has
  one "expert" and no router: its statistics are those of perfect balance.)
Rows per domain (layer 0): the SPEC section 4 statistics over the whole window (`max_vio` as
`max_vio_global`), `max_vio_batch` per forward (`step` = batch index) and `expert_load`, each
expert's share of the kept assignments (column `expert`).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from moe_bench import data
from moe_bench.config import BalanceConfig, Resolved, resolve
from moe_bench.metrics import max_vio, window_stats
from moe_bench.results import Recorder
from moe_bench.tasks import build_layer

UNITS = {"router_entropy": "nats", "dead_experts": "experts"}


def text_batches(run: Resolved) -> dict[str, list[torch.Tensor]]:
    """Per corpus domain, up to task.batches batches x_BSD of consecutive embedded bytes."""
    task: BalanceConfig = run.task
    m = run.model
    split = data.load(run.data).split("train")
    generator = torch.Generator().manual_seed(run.seed)
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
        batches[domain] = [emb_VD[idx_BS].to(run.device, run.dtype) for idx_BS in idx_NBS]
    return batches


def skewed_batches(run: Resolved, layer: nn.Module) -> list[torch.Tensor]:
    """Tokens leaning toward expert 0's centroid (a random direction for dense, no router)."""
    task: BalanceConfig = run.task
    m = run.model
    generator = torch.Generator().manual_seed(run.seed + 1)
    if layer.router is None:
        u_D = torch.randn(m.d_model, generator=generator)
    else:
        u_D = layer.router.weight[0].detach().float().cpu()
    u_D = u_D / u_D.norm()
    shape = (m.tokens // m.seq_len, m.seq_len, m.d_model)
    return [
        (task.skew * u_D + torch.randn(shape, generator=generator)).to(run.device, run.dtype)
        for _ in range(task.batches)
    ]


def run(cfg: DictConfig, recorder: Recorder) -> None:
    run = resolve(cfg)
    layer = build_layer(run).eval()
    inputs = {**text_batches(run), "skewed": skewed_batches(run, layer)}
    with torch.no_grad():
        for domain, batches in inputs.items():
            routings = [layer(x_BSD).routing for x_BSD in batches]
            for step, routing in enumerate(routings):
                recorder.log(
                    "max_vio_batch", max_vio(routing.load), step=step, domain=domain, layer=0
                )
            stats = window_stats(routings)
            stats["max_vio_global"] = stats.pop("max_vio")
            for metric, value in stats.items():
                recorder.log(metric, value, unit=UNITS.get(metric, ""), domain=domain, layer=0)
            load_E = sum(r.load.cpu() for r in routings).double()
            for expert, share in enumerate((load_E / load_E.sum()).tolist()):
                recorder.log(
                    "expert_load", share, unit="share", domain=domain, layer=0, expert=expert
                )
    recorder.flush()
