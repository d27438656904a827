"""gpt_oss: gpt-oss's MoE block (HF transformers `GptOssMLP`, transformers 5.25,
models/gpt_oss/modeling_gpt_oss.py).

Shape legend: T tokens, D model width, E experts, K experts per token.

- Router (`GptOssTopKRouter`): logits u = x W^T + b with a learned bias b [E]
  (`layer.router.bias`, a parameter; `Routing.logits` includes it, as HF's `router_logits`);
  top-K of the logits, then softmax over the K kept logits: Mixtral's rule
  (variants/mixtral.py) plus the bias.
- Experts (`GptOssExperts`): biases on every projection (`expert_bias`: b1, b3 [E, H],
  b2 [E, D]) and the clamped SwiGLU (`activation="clamped_swiglu"`,
  variants/compute/experts.py): gate clamped above at 7, up to [-7, 7],
  `gate * sigmoid(1.702 gate) * (up + 1)`. HF stores gate and up interleaved in one
  `gate_up_proj` [E, D, 2H] (gate = even columns, up = odd); here they are w1 and w3.
- Dropless; no shared expert.
- Balance: HF's `load_balancing_loss_func` (softmax over all E of the biased logits, top-K
  choices) with `router_aux_loss_coef` c = 0.001 is K times the suite's form, so
  balance_coef = K c = 0.004.
- Defaults: HF's `GptOssConfig` (gpt-oss-120b): E = 128, K = 4, expert width = d_model
  (2880 = 2880; 512 at the suite's d_model 512).
Parity with HF's block: tests/variants/test_shipped_parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .contract.config import MoEConfig
from .mixtral import MixtralConfig, MixtralRouter


@dataclass
class GptOssConfig(MixtralConfig):
    note: ClassVar[str] = (
        "0.004 · E · Σ_i f_i P_i with f_i = count_i / (T·K): HF's router_aux_loss_coef 0.001 "
        "on its K-times-larger form."
    )
    dropless: ClassVar[str | None] = "gpt_oss is dropless: every selected expert computes"
    num_experts: int = 128
    top_k: int = 4
    expert_hidden: int = 512
    activation: str = "clamped_swiglu"
    balance_coef: float = 0.004
    expert_bias: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.expert_bias, bool):
            raise ValueError(f"expert_bias={self.expert_bias!r} must be true or false")


class GptOssRouter(MixtralRouter):
    """Mixtral's top-K-then-softmax on logits with a learned per-expert bias."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return super().logits(x_TD) + self.bias.to(self.dtype)
