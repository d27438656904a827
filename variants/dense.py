"""dense: the baseline, one FFN of width `d_ff` applied to every token (no routing).

Its default width is the active width of the MoE described by the same fields,
`expert_hidden * (top_k + num_shared_experts)`, so `build("dense", **moe_fields)` is the
equal-active-FLOPs reference. The `backend` field is accepted and has no effect: there is
nothing to dispatch, the FFN is one GEMM per projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .compute.assignments import make_routing
from .compute.experts import ExpertBank
from .contract.config import MoEConfig, check_int
from .contract.layer import MoEOutput, assemble, check_input_dtype, flatten_tokens


@dataclass
class DenseConfig(MoEConfig):
    note: ClassVar[str] = "No router, no auxiliary loss: one FFN of width d_ff."
    kind: ClassVar[str] = "dense"
    d_ff: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.d_ff is None:
            self.d_ff = self.expert_hidden * (self.top_k + self.num_shared_experts)
        check_int(self, "d_ff", 1)

    def active_width(self) -> float:
        return self.d_ff


class DenseFFN(nn.Module):
    def __init__(self, cfg: DenseConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts = ExpertBank(1, cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        """`token_ids` is accepted and ignored (docs/contract.md §2)."""
        x_TD, _ = flatten_tokens(x, self.cfg.d_model)
        check_input_dtype(x_TD, self.experts.w1)
        T, dev = x_TD.shape[0], x_TD.device
        # every token "routed" to the one FFN with weight 1, so reports need no special case
        routing = make_routing(
            token_A=torch.arange(T, device=dev),
            expert_A=torch.zeros(T, dtype=torch.long, device=dev),
            weight_A=torch.ones(T, device=dev),
            scores_TE=torch.ones(T, 1, device=dev),
            logits_TE=torch.zeros(T, 1, device=dev),
            demand_E=torch.tensor([T], device=dev),
        )
        return assemble(x, self.experts.sum_all(x_TD), {}, routing)

    def update_bias(self) -> None:
        """No bias to update."""
