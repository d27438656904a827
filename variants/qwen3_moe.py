"""qwen3_moe: Qwen3-MoE's sparse block (HF transformers `Qwen3MoeSparseMoeBlock`).

The DeepSeekMoE router (`variants.deepseek_moe`) with Qwen3-MoE's settings; the HF code
(transformers 5.25, models/qwen3_moe/modeling_qwen3_moe.py, `Qwen3MoeTopKRouter`) is:
p = softmax(x W^T) over the E experts, top-K of p, the K weights renormalised to sum to 1 when
`norm_topk_prob`, no shared expert, SwiGLU experts (`silu(x w_gate) * (x w_up)) w_down`).
Parity with that block: tests/variants/test_shipped_parity.py.

Defaults are HF's `Qwen3MoeConfig`: E = 128, K = 8, `norm_topk_prob` False (the released
Qwen3-30B-A3B's config.json sets it True; `sweeps/variant/qwen3_moe.yaml` does), d_model 2048
and expert width 768 (expert_hidden = 0.375 d_model; here 192 at the suite's d_model 512).
Balance: HF's `load_balancing_loss_func` with `router_aux_loss_coef` c = 0.001 is K times the
suite's form (variants/mixtral.py), so alpha1 = K c = 0.008. Departure: none in the routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .deepseek_moe import DeepSeekMoEConfig


@dataclass
class Qwen3MoEConfig(DeepSeekMoEConfig):
    note: ClassVar[str] = (
        "α1 · Σ_i f_i P_i with f_i = E/(K·T) · count_i, α1 = K · 0.001 (HF's "
        "router_aux_loss_coef 0.001 on its K-times-larger form)."
    )
    num_experts: int = 128
    top_k: int = 8
    expert_hidden: int = 192
    num_shared_experts: int = 0
    activation: str = "swiglu"
    alpha1: float = 0.008
