"""olmoe: OLMoE's sparse block (Muennighoff et al. 2024, arXiv:2409.02060; HF transformers
`OlmoeSparseMoeBlock`).

The DeepSeekMoE router (`variants.deepseek_moe`) with OLMoE's settings; the HF code
(transformers 5.25, models/olmoe/modeling_olmoe.py, `OlmoeTopKRouter`) is: p = softmax(x W^T)
over 64 experts, top-8 of p, no renormalisation (`norm_topk_prob` False), no shared expert,
SwiGLU experts. Parity with that block: tests/variants/test_shipped_parity.py.

Defaults are HF's `OlmoeConfig`: E = 64, K = 8, d_model 2048, expert width 2048 (the released
OLMoE-1B-7B uses 1024, half of d_model: expert_hidden 256 at the suite's d_model 512).
Balance: HF's `router_aux_loss_coef` c = 0.01 on its K-times-larger form gives alpha1 = K c =
0.08. Departure: the paper also trains with a router z-loss (0.001); HF's block and loss
function compute none, and neither does this variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .deepseek_moe import DeepSeekMoEConfig


@dataclass
class OLMoEConfig(DeepSeekMoEConfig):
    note: ClassVar[str] = (
        "α1 · Σ_i f_i P_i with f_i = E/(K·T) · count_i, α1 = K · 0.01 (HF's "
        "router_aux_loss_coef 0.01 on its K-times-larger form)."
    )
    num_experts: int = 64
    top_k: int = 8
    expert_hidden: int = 256
    num_shared_experts: int = 0
    activation: str = "swiglu"
    alpha1: float = 0.08
