"""One registry of runnable components: every variant of `variants` and every peer system.

A component says what it is, so the runner, the tasks and the report never ask a name or an
attribute (docs/contract.md, "Components"):
- `kind`: "routed" (a router picks experts) or "dense" (one FFN: the equal-active-FLOPs
  baseline), taken from its config class;
- `origin`: "variants" (this suite's implementation) or "peer" (another library's layer,
  unmodified: `moe_bench.peers`);
- `trains`: whether `task=convergence` can train it inside the tiny LM;
- how it is built on a device and dtype, and how its parameters are counted without
  allocating it (a peer that cannot be built off its GPU counts its shapes).

    from moe_bench import components
    comp = components.lookup("switch")
    cfg = comp.make_config(d_model=64, num_experts=8, expert_hidden=128)
    layer = comp.build(cfg, torch.device("cpu"), torch.float32)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import variants
from moe_bench import peers
from moe_bench.isocompute import count_params

ORIGINS = ("variants", "peer")
BASELINE = "dense"  # the component every ratio_to_dense divides by
Build = Callable[[Any, torch.device, torch.dtype], nn.Module]


@dataclass(frozen=True)
class Component:
    name: str
    config: type[variants.MoEConfig]
    origin: str
    trains: bool
    build_fn: Build
    count_fn: Callable[[Any], tuple[int, int]]

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"

    def make_config(self, **fields: Any) -> variants.MoEConfig:
        """The validated config (paper defaults for fields not given)."""
        return self.config.from_fields(self.name, fields)

    def build(self, cfg: variants.MoEConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The layer for `cfg` on `device` in `dtype`; calling it returns a MoEOutput."""
        return self.build_fn(cfg, device, dtype)

    def param_counts(self, cfg: variants.MoEConfig) -> tuple[int, int]:
        """(total, active per token) parameters of the layer `cfg` describes."""
        return self.count_fn(cfg)


def _variant(name: str) -> Component:
    make = variants.lookup(name).make

    def build(cfg: variants.MoEConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
        with torch.device(device):  # initialised where it runs: GPU-sized layers init in ms
            layer = make(cfg)
        return layer.to(device=device, dtype=dtype)

    def count(cfg: variants.MoEConfig) -> tuple[int, int]:
        with torch.device("meta"):  # shapes only, nothing allocated
            return count_params(make(cfg))

    return Component(name, variants.lookup(name).config, "variants", True, build, count)


COMPONENTS: dict[str, Component] = {
    **{name: _variant(name) for name in variants.names()},
    # megablocks' own dMoE (GPU, bf16): built on its own terms, its shapes counted analytically
    "megablocks_dmoe": Component(
        name="megablocks_dmoe",
        config=peers.MegablocksDMoEConfig,
        origin="peer",
        trains=False,
        build_fn=peers.build_megablocks_dmoe,
        count_fn=peers.param_counts,
    ),
}


def names() -> list[str]:
    """Every runnable component: the variants, then the peers."""
    return list(COMPONENTS)


def lookup(name: str) -> Component:
    if name not in COMPONENTS:
        raise ValueError(f"variant={name!r} is not one of {', '.join(map(repr, COMPONENTS))}")
    return COMPONENTS[name]
