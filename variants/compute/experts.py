"""ExpertBank: E stacked FFN experts, the weights every backend computes with.

Shape legend: E experts, D model width, H hidden width of one expert, N rows of one expert.

gelu:   FFN(x) = gelu(x @ w1) @ w2                    (exact erf gelu, torch's default)
swiglu: FFN(x) = (silu(x @ w1) * (x @ w3)) @ w2       (Shazeer 2020, arXiv:2002.05202)
clamped_swiglu (gpt-oss, HF transformers `GptOssExperts._apply_gate`): with g = min(x @ w1, 7)
        and u = clamp(x @ w3, -7, 7), FFN(x) = (g * sigmoid(1.702 g) * (u + 1)) @ w2

With `bias=True` every projection adds a per-expert bias (gpt-oss): b1, b3 [E, H] after w1, w3
and b2 [E, D] after w2, so FFN_e(x) = act(x w1_e + b1_e, x w3_e + b3_e) w2_e + b2_e.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# activations with a second input projection w3 (the gate's partner)
GATED = ("swiglu", "clamped_swiglu")
# gpt-oss's constants (HF `GptOssConfig.swiglu_limit` = 7.0; `swiglu_alpha` = 1.702, the
# sigmoid approximation of gelu: x * sigmoid(1.702 x))
SWIGLU_LIMIT = 7.0
SWIGLU_ALPHA = 1.702


def clamped_swiglu(h1: torch.Tensor, h3: torch.Tensor) -> torch.Tensor:
    """gpt-oss's activation: gate h1 clamped above at 7, up h3 to [-7, 7], the gate's
    `g * sigmoid(1.702 g)` times `up + 1` (HF `GptOssExperts._apply_gate`)."""
    gate = h1.clamp(max=SWIGLU_LIMIT)
    up = h3.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    return gate * torch.sigmoid(gate * SWIGLU_ALPHA) * (up + 1)


class ExpertWeights(NamedTuple):
    """The bank's stacked weights, possibly cast: w1 [E, D, H], w2 [E, H, D], w3 [E, D, H]."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor | None


class ExpertBank(nn.Module):
    def __init__(
        self, num_experts: int, d_model: int, hidden: int, activation: str, bias: bool = False
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        gated = activation in GATED
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden)) if gated else None
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.b3 = nn.Parameter(torch.zeros(num_experts, hidden)) if bias and gated else None
        self.reset_parameters()

    @property
    def bias(self) -> bool:
        return self.b1 is not None

    @property
    def plain(self) -> bool:
        """No bias and a gelu or swiglu activation: what the fused padded_bmm kernel of
        `variants.compute.dispatch` computes; other banks take the per-expert path."""
        return not self.bias and self.activation in ("gelu", "swiglu")

    def reset_parameters(self) -> None:
        if self.w1.is_meta:  # shapes only (parameter counts): torch's meta normal_ takes ms
            return
        # fan-in scaling keeps activations O(1) at any D and H (nn.Linear-like magnitude)
        for w in (self.w1, self.w3):
            if w is not None:
                nn.init.normal_(w, std=self.d_model**-0.5)
        nn.init.normal_(self.w2, std=self.hidden**-0.5)

    def weights(self, dtype: torch.dtype) -> ExpertWeights:
        """The weights in `dtype` (differentiable casts; the parameters themselves when equal)."""
        w3 = self.w3.to(dtype) if self.w3 is not None else None
        return ExpertWeights(self.w1.to(dtype), self.w2.to(dtype), w3)

    def act(self, h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
        """Hidden activation from the w1 (and, for gated activations, w3) projections."""
        if h3 is None:
            return F.gelu(h1)
        if self.activation == "clamped_swiglu":
            return clamped_swiglu(h1, h3)
        return F.silu(h1) * h3

    def slice_experts(self, start: int, stop: int) -> ExpertBank:
        """A new bank holding copies of experts `start .. stop-1` (an expert-parallel rank's
        shard); same device and dtype, detached from this bank."""
        if not 0 <= start < stop <= self.num_experts:
            raise ValueError(
                f"expert slice start={start}, stop={stop} must satisfy "
                f"0 <= start < stop <= num_experts={self.num_experts}"
            )
        bank = ExpertBank(stop - start, self.d_model, self.hidden, self.activation, self.bias)
        bank = bank.to(device=self.w1.device, dtype=self.w1.dtype)
        with torch.no_grad():
            for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
                if getattr(self, name) is not None:
                    getattr(bank, name).copy_(getattr(self, name)[start:stop])
        return bank

    def expert_ffn(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """FFN of expert e on its rows: the plain reference every backend is checked against."""
        h1, h3 = x_ND @ self.w1[e], x_ND @ self.w3[e] if self.w3 is not None else None
        if not self.bias:
            return self.act(h1, h3) @ self.w2[e]
        # biases in the matmuls' dtype (autocast's, where on), as the weights are
        h3 = h3 + self.b3[e].to(h3.dtype) if h3 is not None else None
        out = self.act(h1 + self.b1[e].to(h1.dtype), h3) @ self.w2[e]
        return out + self.b2[e].to(out.dtype)

    def sum_all(self, x_TD: torch.Tensor) -> torch.Tensor:
        """sum_e FFN_e(x) for every token (shared experts, dense FFN).

        The E experts side by side are one FFN of width E*H, so this is two (or three) GEMMs.
        """
        E, D, H = self.num_experts, self.d_model, self.hidden
        w1_DF = self.w1.permute(1, 0, 2).reshape(D, E * H)
        h1 = x_TD @ w1_DF
        h3 = x_TD @ self.w3.permute(1, 0, 2).reshape(D, E * H) if self.w3 is not None else None
        if not self.bias:
            return self.act(h1, h3) @ self.w2.reshape(E * H, D)
        h3 = h3 + self.b3.reshape(E * H).to(h3.dtype) if h3 is not None else None
        out = self.act(h1 + self.b1.reshape(E * H).to(h1.dtype), h3) @ self.w2.reshape(E * H, D)
        return out + self.b2.sum(0).to(out.dtype)
