"""Checkpoints of the convergence task, and upcycling an MoE LM from a dense one.

Shape legend: D model width, F the dense parent's FFN width, E routed experts, H one expert's
hidden width, m = F / H (shards of the dense FFN, granular upcycling).

`task.save=true` writes the trained LM into its job folder as `model.pt` (atomically: a temp
file in the same folder, then a rename), with what a child needs to check it: the variant, its
kind, the layer config, the LM config and the step.

`task.init_from=<job folder of a dense run saved with task.save=true>` starts the LM from that
checkpoint; `task.upcycle` says how each routed layer's experts are filled from the block's
dense FFN (the router, and any other routing parameter, stays freshly initialised):
- `copy` (sparse upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055, Sec. 3.1): every
  expert is a copy of the FFN (expert_hidden = F). With kept weights that sum to 1 per token
  (renormalised top-K, mixtral) the upcycled layer computes the dense FFN exactly.
- `granular` (fine-grained upcycling, He et al. 2024, arXiv:2410.07524; Megatron-Core's
  `--moe-use-upcycling` with granularity): the FFN's F hidden units are cut into m = F / H
  contiguous shards; expert e is shard e mod m (E a multiple of m, so each shard appears E/m
  times). The shards' outputs sum to the FFN's, so a routing that keeps one copy of every shard
  with weight 1 computes the dense FFN exactly; a softmax router's weights differ from 1, which
  the paper corrects by scaling weights (not done here).
- `upcycle_noise` > 0 multiplies every copied expert weight by (1 + noise * N(0, 1)), drawn
  from the job's seed, to break the copies' symmetry (the paper discusses noise on the copies;
  off by default, as in its main runs).
Attention, embeddings, norms and a dense block's FFN (moe_every > 1) are copied as they are;
a dense child continues its parent (the control of "upcycled vs continued dense").
Shared experts are not filled (a layer with num_shared_experts > 0 is refused).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_bench.lm import TinyLM
from variants.contract.config import check_choice, check_number

CHECKPOINT = "model.pt"
UPCYCLE_RULES = ("copy", "granular")
LM_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "tie_embeddings")


def check_fields(task: Any) -> None:
    """The task's upcycling and saving fields, one line per bad value."""
    if task.init_from is not None and (not isinstance(task.init_from, str) or not task.init_from):
        raise ValueError(f"init_from={task.init_from!r} must be a job folder path or null")
    check_choice(task, "upcycle", UPCYCLE_RULES)
    check_number(task, "upcycle_noise", minimum=0)
    if not isinstance(task.save, bool):
        raise ValueError(f"save={task.save!r} must be true or false")


def save_checkpoint(lm: TinyLM, variant: str, layer: Any, step: int, job_dir: Path) -> Path:
    """Write `job_dir/model.pt` atomically; returns its path."""
    path = Path(job_dir) / CHECKPOINT
    payload = {
        "variant": variant,
        "kind": layer.kind,
        "layer": dataclasses.asdict(layer),
        "lm": dataclasses.asdict(lm.cfg),
        "step": step,
        "state_dict": {k: v.detach().cpu() for k, v in lm.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(init_from: str) -> dict[str, Any]:
    """The checkpoint in job folder `init_from`; ValueError naming task.init_from otherwise."""
    path = Path(init_from) / CHECKPOINT
    if not path.is_file():
        raise ValueError(
            f"task.init_from={init_from!r} holds no {CHECKPOINT}: give the job folder of a "
            "dense convergence run that ran with task.save=true"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why, in one line
        raise ValueError(
            f"task.init_from={init_from!r}: {CHECKPOINT} is unreadable ({e})"
        ) from None


def check_parent(lm: TinyLM, parent: dict[str, Any], init_from: str) -> None:
    """The parent must be a dense run of the same LM shape."""
    where = f"task.init_from={init_from!r}"
    if parent["kind"] != "dense":
        raise ValueError(
            f"{where} holds a {parent['variant']!r} run; upcycling starts from a dense run "
            "(variant=dense)"
        )
    own = dataclasses.asdict(lm.cfg)
    for name in LM_FIELDS:
        if parent["lm"][name] != own[name]:
            raise ValueError(
                f"{where} was trained with {name}={parent['lm'][name]}, this run has "
                f"{name}={own[name]}: they must match"
            )
    for block in lm.blocks:
        cfg = block.ffn.cfg
        if cfg.activation != parent["layer"]["activation"]:
            raise ValueError(
                f"variant.activation={cfg.activation!r} must match the dense parent's "
                f"({parent['layer']['activation']!r}, {where})"
            )
        if getattr(block.ffn, "shared", None) is not None:
            raise ValueError(
                f"num_shared_experts={cfg.num_shared_experts} must be 0 to upcycle: only "
                "routed experts are filled from the dense FFN"
            )


def shard_index(rule: str, num_experts: int, hidden: int, width: int) -> list[int]:
    """Per expert, which of the dense FFN's m = width / hidden shards it gets (copy: m = 1)."""
    if rule == "copy":
        if hidden != width:
            raise ValueError(
                f"task.upcycle='copy' needs expert_hidden={width} (the dense parent's FFN "
                f"width); this run has expert_hidden={hidden}"
            )
        return [0] * num_experts
    if width % hidden or num_experts % (width // hidden):
        raise ValueError(
            f"task.upcycle='granular' needs expert_hidden={hidden} to divide the dense "
            f"parent's FFN width {width} into m shards and num_experts={num_experts} to be a "
            "multiple of m"
        )
    m = width // hidden
    return [e % m for e in range(num_experts)]


@torch.no_grad()
def fill_experts(
    ffn: nn.Module,
    dense: dict[str, torch.Tensor],
    rule: str,
    noise: float,
    generator: torch.Generator,
) -> None:
    """Fill `ffn.experts` ([E, D, H] banks) from one dense FFN (`dense`: w1 [1, D, F], w2
    [1, F, D], w3 when swiglu)."""
    bank = ffn.experts
    width = dense["w1"].shape[-1]
    if ffn.cfg.kind == "dense":  # a dense block of the child: the same FFN, copied
        shard = [0]
        hidden = width
        if bank.hidden != width:
            raise ValueError(
                f"a dense block of width {bank.hidden} cannot take the parent's FFN of width "
                f"{width}: set task.moe_every=1 or size the variant to match"
            )
    else:
        shard = shard_index(rule, bank.num_experts, bank.hidden, width)
        hidden = bank.hidden
    for name in ("w1", "w2", "w3"):
        target = getattr(bank, name)
        if target is None:
            continue
        src = dense[name][0]
        for e, s in enumerate(shard):
            cut = slice(s * hidden, (s + 1) * hidden)
            piece = src[cut] if name == "w2" else src[:, cut]  # w2 [F, D]; w1, w3 [D, F]
            if noise > 0:
                piece = piece * (1 + noise * torch.randn(piece.shape, generator=generator))
            target[e].copy_(piece.to(target.dtype))


def upcycle(lm: TinyLM, task: Any, seed: int) -> None:
    """Start `lm` from the dense checkpoint in `task.init_from` by `task.upcycle`. Everything
    but the FFN blocks is copied; routers stay fresh."""
    parent = load_checkpoint(task.init_from)
    check_parent(lm, parent, task.init_from)
    state = parent["state_dict"]
    own = lm.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            if ".ffn." not in name:
                tensor.copy_(state[name].to(tensor))
    generator = torch.Generator().manual_seed(seed)
    for i, block in enumerate(lm.blocks):
        prefix = f"blocks.{i}.ffn.experts."
        dense = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        fill_experts(block.ffn, dense, task.upcycle, task.upcycle_noise, generator)
