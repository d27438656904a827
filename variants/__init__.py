"""variants: Mixture-of-Experts routing variants behind one contract (docs/contract.md §2).

    import variants
    layer = variants.build("switch", d_model=64, num_experts=8, expert_hidden=128)
    out = layer(x)          # out.y, out.aux_loss, out.losses, out.routing

An explicit registry: a name maps to its config dataclass (paper defaults) and its layer
factory. Unknown names and invalid fields raise ValueError naming the field, value and rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from .compute.assignments import Routing, experts_per_token, experts_per_token_stats
from .compute.experts import ExpertBank
from .contract.config import MoEConfig
from .contract.layer import MoELayer, MoEOutput, routed
from .contract.routing import Router
from .deepseek_moe import DeepSeekMoEConfig, DeepSeekMoERouter
from .deepseek_v2 import DeepSeekV2Config, DeepSeekV2Router
from .deepseek_v3 import DeepSeekV3Config, DeepSeekV3Router
from .deepseek_v4 import DeepSeekV4Config
from .dense import DenseConfig, DenseFFN
from .expert_choice import ExpertChoiceConfig, ExpertChoiceRouter
from .gpt_oss import GptOssConfig, GptOssRouter
from .gshard import GShardConfig, GShardRouter
from .hash_routing import HashConfig, HashRouter
from .llama4 import Llama4Config, Llama4Router
from .longcat_flash import LongcatFlashConfig, LongcatFlashLayer
from .mixtral import MixtralConfig, MixtralRouter
from .moe_plus_plus import MoEPlusPlusConfig, MoEPlusPlusLayer
from .noisy_topk import NoisyTopKConfig, NoisyTopKRouter
from .olmoe import OLMoEConfig
from .phimoe import PhimoeConfig, PhimoeRouter
from .qwen3_moe import Qwen3MoEConfig
from .qwen3_next import Qwen3NextConfig
from .remoe import ReMoEConfig, ReMoERouter
from .sinkhorn import SinkhornConfig, SinkhornRouter
from .switch import SwitchConfig, SwitchRouter
from .topp import TopPConfig, TopPRouter
from .xmoe import XMoEConfig, XMoERouter


class Variant(NamedTuple):
    config: type[MoEConfig]
    make: Callable[[Any], nn.Module]


REGISTRY: dict[str, Variant] = {
    "dense": Variant(DenseConfig, DenseFFN),
    "switch": Variant(SwitchConfig, routed(SwitchRouter)),
    "gshard": Variant(GShardConfig, routed(GShardRouter)),
    "deepseek_moe": Variant(DeepSeekMoEConfig, routed(DeepSeekMoERouter)),
    "deepseek_v3": Variant(DeepSeekV3Config, routed(DeepSeekV3Router)),
    "deepseek_v2": Variant(DeepSeekV2Config, routed(DeepSeekV2Router)),
    "mixtral": Variant(MixtralConfig, routed(MixtralRouter)),
    "expert_choice": Variant(ExpertChoiceConfig, routed(ExpertChoiceRouter)),
    "noisy_topk": Variant(NoisyTopKConfig, routed(NoisyTopKRouter)),
    "topp": Variant(TopPConfig, routed(TopPRouter)),
    "remoe": Variant(ReMoEConfig, routed(ReMoERouter)),
    "moe_plus_plus": Variant(MoEPlusPlusConfig, MoEPlusPlusLayer),
    "sinkhorn": Variant(SinkhornConfig, routed(SinkhornRouter)),
    "xmoe": Variant(XMoEConfig, routed(XMoERouter)),
    # the routings of released models, each checked against its HF transformers block
    "qwen3_moe": Variant(Qwen3MoEConfig, routed(DeepSeekMoERouter)),
    "qwen3_next": Variant(Qwen3NextConfig, routed(DeepSeekMoERouter)),
    "olmoe": Variant(OLMoEConfig, routed(DeepSeekMoERouter)),
    "phimoe": Variant(PhimoeConfig, routed(PhimoeRouter)),
    "gpt_oss": Variant(GptOssConfig, routed(GptOssRouter)),
    "llama4": Variant(Llama4Config, routed(Llama4Router)),
    "longcat_flash": Variant(LongcatFlashConfig, LongcatFlashLayer),
    "hash": Variant(HashConfig, routed(HashRouter)),
    "deepseek_v4": Variant(DeepSeekV4Config, routed(DeepSeekV3Router)),
}


def names() -> list[str]:
    """Sorted names of the registered variants."""
    return sorted(REGISTRY)


def lookup(name: str) -> Variant:
    if name not in REGISTRY:
        raise ValueError(f"variant={name!r} is not one of {', '.join(map(repr, names()))}")
    return REGISTRY[name]


def make_config(name: str, **fields: Any) -> MoEConfig:
    """The validated config `build` would use (paper defaults for fields not given)."""
    return lookup(name).config.from_fields(name, fields)


def build(name: str, **fields: Any) -> nn.Module:
    """Build variant `name` with the given config fields, validated; returns an nn.Module."""
    variant = lookup(name)
    return variant.make(variant.config.from_fields(name, fields))


def build_config(cfg: MoEConfig) -> nn.Module:
    """The layer of a validated config (e.g. `cfg.at_depth(i)`), by the variant it belongs to."""
    for variant in REGISTRY.values():
        if type(cfg) is variant.config:
            return variant.make(cfg)
    raise ValueError(f"config {type(cfg).__name__} belongs to no registered variant")


__all__ = [
    "REGISTRY",
    "ExpertBank",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Router",
    "Routing",
    "Variant",
    "build",
    "build_config",
    "experts_per_token",
    "experts_per_token_stats",
    "lookup",
    "make_config",
    "names",
]
