"""Training options the ladder tests as causes of the MoE-vs-dense gap (task=convergence).

Shape legend: E experts, D model width.

Each option is a `task.*` field of `ConvergenceConfig`, off by default (the default path is
unchanged), and applies to every MoE layer of the LM through what the layer is (a
`variants.contract.routing.Router`, a token-choice config with a capacity), never a name:
- `router_init_scale` s: every router's centroids `weight [E, D]` drawn from a normal of mean 0
  and std sqrt(s / D), truncated at two standard deviations: Switch Transformer's
  initialisation (Fedus et al. 2021, arXiv:2101.03961, Sec. 2.4, "Smaller parameter
  initialization for stability": s = 1 is the default Transformer scale, the paper recommends
  s = 0.1; Mesh TensorFlow's truncated normal cuts at 2 std). Departure: the paper scales every
  weight matrix; here only the router, the part our LM inits as nn.Linear (std 1/sqrt(3 D),
  i.e. s = 1/3; the LM's own weights keep GPT-2's std 0.02). Null keeps the router's own init.
  Drawn from a generator seeded by the job's seed, so the global random stream is untouched.
- `eval_capacity` false: evaluation forwards run dropless (capacity_factor None) while training
  keeps the variant's capacity, i.e. drops in training only. Our switch applies its capacity in
  evaluation too (variants/switch.py); the alternative routes every token at evaluation, as
  dropless implementations do everywhere (MegaBlocks, Gale et al. 2022, arXiv:2211.15841).
  Token-choice variants only: in expert choice the capacity is the routing rule itself (Zhou
  et al. 2022), so it is refused there.
The router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906, Eq. 5, coefficient 1e-3) is a
variant field (`variant.z_loss_coef`) of switch, gshard and deepseek_moe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from variants.contract.routing import Router

TRUNCATE_STD = 2.0  # Mesh TensorFlow's truncated normal: redrawn beyond 2 standard deviations


def routers(lm: nn.Module) -> list[Router]:
    return [m for m in lm.modules() if isinstance(m, Router)]


@torch.no_grad()
def init_routers(lm: nn.Module, scale: float, seed: int) -> int:
    """Redraw every router's centroids with Switch's truncated normal of std sqrt(scale / D);
    returns how many routers were redrawn."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    found = routers(lm)
    for router in found:
        w_ED = router.weight
        std = (scale / w_ED.shape[1]) ** 0.5
        fresh_ED = torch.empty(w_ED.shape, dtype=w_ED.dtype)
        bound = TRUNCATE_STD * std
        nn.init.trunc_normal_(fresh_ED, 0.0, std, -bound, bound, generator=generator)
        w_ED.copy_(fresh_ED)
    return len(found)


def capacity_configs(lm: nn.Module) -> list:
    """The distinct configs of the LM's MoE layers that carry a capacity factor."""
    seen: dict[int, object] = {}
    for module in lm.modules():
        cfg = getattr(module, "cfg", None)
        if getattr(cfg, "capacity_factor", None) is not None:
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def check_dropless_eval(layer: object, variant: str) -> None:
    """ValueError naming the field when `task.eval_capacity=false` cannot apply to the layer."""
    if getattr(layer, "kind", "routed") != "routed":
        return  # the dense FFN has no capacity: the option changes nothing
    if not getattr(layer, "token_choice", True):
        raise ValueError(
            f"task.eval_capacity=false is not allowed for variant={variant!r}: its capacity is "
            "the routing rule (expert choice), not a training-time drop; use true"
        )
    if getattr(layer, "capacity_factor", None) is not None:
        try:
            dataclasses.replace(layer, capacity_factor=None)
        except ValueError as e:
            raise ValueError(
                f"task.eval_capacity=false is not allowed for variant={variant!r}: {e}"
            ) from None


@contextmanager
def dropless(lm: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every MoE layer routes without capacity (capacity_factor None); the
    factors are restored on exit, also after an error."""
    saved = [(cfg, cfg.capacity_factor) for cfg in capacity_configs(lm)] if enabled else []
    try:
        for cfg, _ in saved:
            object.__setattr__(cfg, "capacity_factor", None)
        yield
    finally:
        for cfg, factor in saved:
            object.__setattr__(cfg, "capacity_factor", factor)
