"""qwen3_next: Qwen3-Next's sparse block (HF transformers `Qwen3NextSparseMoeBlock`).

The DeepSeekMoE router (`variants.deepseek_moe`) with the Qwen2-MoE shared-expert options
(`variants.contract.config.SharedExpertConfig`); the HF code (transformers 5.25,
models/qwen3_next/modeling_qwen3_next.py) is Qwen3-MoE's router (softmax over E, top-K,
`norm_topk_prob` True) plus one shared SwiGLU expert of width `shared_expert_intermediate_size`
whose output is scaled per token by sigmoid(x w_g), w_g [1, D] (`shared_expert_gate`).
Parity with that block: tests/variants/test_shipped_parity.py.

Defaults are HF's `Qwen3NextConfig`: E = 512, K = 10, one shared expert, d_model 2048, expert
and shared widths 512 (a quarter of d_model: 128 at the suite's d_model 512). Balance: HF's
`router_aux_loss_coef` c = 0.001 on its K-times-larger form gives alpha1 = K c = 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .deepseek_moe import DeepSeekMoEConfig


@dataclass
class Qwen3NextConfig(DeepSeekMoEConfig):
    note: ClassVar[str] = (
        "α1 · Σ_i f_i P_i with f_i = E/(K·T) · count_i, α1 = K · 0.001 (HF's "
        "router_aux_loss_coef 0.001 on its K-times-larger form)."
    )
    num_experts: int = 512
    top_k: int = 10
    expert_hidden: int = 128
    num_shared_experts: int = 1
    activation: str = "swiglu"
    shared_gate: bool = True
    norm_topk_prob: bool = True
    alpha1: float = 0.01
