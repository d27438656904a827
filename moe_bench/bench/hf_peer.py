"""HF transformers' MoE block as a benchmark peer: DeepSeek-V2's router, experts and shared MLP.

Shape legend: T tokens, D model width, E experts, H expert hidden width, K experts per token.

The modules are transformers' own, unmodified (transformers 5.24,
models/deepseek_v2/modeling_deepseek_v2.py): `DeepseekV2TopkRouter` (softmax, greedy top-K),
`DeepseekV2Experts` (SwiGLU experts, weights [E, 2H, D] and [E, D, H]) and, with shared experts,
`DeepseekV2MLP`. The forward is `DeepseekV2Moe.forward`: routed experts plus the shared MLP.
`experts_implementation` picks HF's expert kernel: "grouped_mm" (sort by expert,
`torch.nn.functional.grouped_mm`, un-permute, sum over K) or "eager" (a loop over the experts
that received tokens). HF creates its parameters uninitialised (`torch.empty`), or zero for the
router; here every one is drawn like ours (normal, std fan_in^-0.5), seeded, so routing is not
degenerate. Activation: SwiGLU only (HF's DeepSeek-V2 experts are gated).

transformers is an optional dev dependency; `available()` says why not where it is missing.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from variants import MoEOutput

IMPLEMENTATIONS = ("grouped_mm", "eager")


def available() -> str | None:
    """None where transformers imports, else the reason (for `pytest.skip`)."""
    if importlib.util.find_spec("transformers") is None:
        return (
            "transformers is not installed (optional, in the dev extra: pip install "
            "'transformers>=5.24'); hf_style stands in for HF's DeepseekMoE training path"
        )
    return None


class HFDeepseekV2MoE(nn.Module):
    """`y = experts(x, top-K of router(x)) + shared_mlp(x)`, as `DeepseekV2Moe.forward`."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        expert_hidden: int,
        top_k: int,
        num_shared_experts: int,
        implementation: str,
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
        from transformers.models.deepseek_v2 import configuration_deepseek_v2 as conf
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf

        config = conf.DeepseekV2Config(
            hidden_size=d_model,
            num_attention_heads=1,
            n_routed_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=expert_hidden,
            n_shared_experts=num_shared_experts,
            topk_method="greedy",
            hidden_act="silu",
            experts_implementation=implementation,
        )
        self.gate = hf.DeepseekV2TopkRouter(config)
        self.experts = hf.DeepseekV2Experts(config)
        self.shared_experts = (
            hf.DeepseekV2MLP(config, intermediate_size=expert_hidden * num_shared_experts)
            if num_shared_experts
            else None
        )
        self.implementation = implementation
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(std=p.shape[-1] ** -0.5)  # every weight here is [..., out, in]

    def forward(self, x_TD: torch.Tensor) -> MoEOutput:
        _, weight_TK, expert_TK = self.gate(x_TD)
        y_TD = self.experts(x_TD, expert_TK, weight_TK.to(x_TD.dtype))
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return MoEOutput(y=y_TD, aux_loss=torch.zeros((), device=x_TD.device))
