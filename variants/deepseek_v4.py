"""deepseek_v4: DeepSeek-V3's router with sqrt(softplus) affinities, hash routing in the first
`hash_layers` MoE layers of a model (HF transformers `DeepseekV4SparseMoeBlock`).

DeepSeek-V4 as HF transformers implements it (`DeepseekV4TopKRouter`, `DeepseekV4HashRouter`,
`DeepseekV4Config`); where it and the paper differ this follows the HF code.

- The "moe" layers (this variant's layer): `deepseek_v3` with s = sqrt(softplus(x W^T))
  (`score="sqrtsoftplus"`), top-K of s + b (`router.expert_bias`, HF
  `e_score_correction_bias`), weights s_i / sum of the selected s times
  `routed_scaling_factor` (1.5), no expert groups, one shared expert of the routed width.
- The "hash_moe" layers: a model's first `hash_layers` MoE layers (HF `mlp_layer_types`,
  default 3) route by token id: `at_depth(i)` gives their config, the `hash` variant
  (`variants.hash_routing`) with the same sizes, score, normalisation, scale and shared
  expert, its table seeded `hash_seed + i` so each layer draws its own.
- Departures: the HF experts clamp SwiGLU's pre-activations (`swiglu_limit` 10: gate <= 10,
  up in [-10, 10]); the experts here do not clamp (the parity tests check inputs whose
  pre-activations stay inside the limit). The HF code has no training rule for the bias nor
  any balance loss: the bias update and sequence-wise loss are DeepSeek-V3's.

Defaults (HF `DeepseekV4Config`): 256 routed experts, top-6, 1 shared, scale 1.5, 3 hash layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .contract.config import MoEConfig, check_int
from .deepseek_v3 import DeepSeekV3Config
from .hash_routing import HashConfig


@dataclass
class DeepSeekV4Config(DeepSeekV3Config):
    note: ClassVar[str] = (
        "DeepSeek-V3's bias balancing (rate 1e-3) and sequence-wise loss α = 1e-4 in the "
        "learned-router layers; the first hash layers route by a fixed id table, no loss."
    )
    num_experts: int = 256
    top_k: int = 6
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.5
    score: str = "sqrtsoftplus"
    hash_layers: int = 3
    vocab_size: int = 256
    hash_seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int(self, "hash_layers", 0)
        check_int(self, "vocab_size", 1)
        check_int(self, "hash_seed", 0)

    def at_depth(self, moe_index: int) -> MoEConfig:
        """The first `hash_layers` MoE layers hash-route (HF `mlp_layer_types`), the rest not."""
        if moe_index >= self.hash_layers:
            return self
        shared = {f.name for f in dataclasses.fields(HashConfig)} - {"hash_seed", "capacity_factor"}
        fields = {name: getattr(self, name) for name in shared}
        return HashConfig(**fields, hash_seed=self.hash_seed + moe_index)
