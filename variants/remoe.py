"""remoe: ReLU routing (Wang, Chen, Zhu 2025, "ReMoE: Fully Differentiable Mixture-of-Experts
with ReLU Routing", ICLR 2025, arXiv:2412.14711, Sec. 3).

Shape legend: T tokens, D model width, E experts, K nominal experts per token, A kept
assignments (a token keeps 0..E experts).

- Router (Eq. 5): R(x) = ReLU(x W^T); an expert is active for a token where R > 0, and its
  combine weight is R itself: y = sum_e R(x)_e FFN_e(x). Fully differentiable, no top-k.
- Sparsity control (Sec. 3.3; L1 Eq. 9, update Eq. 7, S_i Eq. 8), an adaptive L1 regulariser:
      L_reg = mean_t sum_e f_e R(x_t)_e                       (with the balancing refinement)
      lambda_{i+1} = lambda_i * alpha ** sign(S_target - S_i),  S_target = 1 - K/E,
  S_i = 1 - (active (token, expert) pairs) / (T E) is the sparsity of step i's training
  forwards, alpha = 1.2, lambda_0 = 1e-8 (the paper's constants).
- Load-balancing refinement (Eq. 10): each expert's L1 term is weighted by its (detached)
  load f_e = E/(K T) * #tokens with R(x_t)_e > 0, so busy experts are pushed harder towards
  zero. `balance_refinement=False` gives the plain L1 of Eq. 9 (f_e = 1).
- The weighted regulariser `lambda_i * L_reg` is reported as `balance` (the contract's
  fixed loss names, docs/contract.md §2).

State and the training loop: lambda is a buffer (`router.l1_coef`). Training forwards count
active pairs and slots; `update_bias()` (the layer contract's once-per-optimizer-step hook, which
the training loop already calls) applies the update rule from the sparsity counted since the last
call, then resets the count. Eval forwards change no state. In data-parallel training
all-reduce `router.active_count` and `router.slot_count` before `update_bias()`.

Scale note: lambda grows by at most 1.2x per step from 1e-8, so it needs ~100 optimizer steps
to reach O(1): a run of a few hundred steps spends much of its time in the paper's first,
near-dense training stage (every expert active), at up to E/K times the routed FLOPs.

Departures: the paper measures S_i over all layers of the model and shares one lambda; here each
layer holds its own lambda from its own sparsity (the suite's layers are independent modules).
Dropless; `capacity_factor` is rejected. force_uniform_routing gives top_k round-robin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .compute.assignments import Routing, make_routing
from .contract.config import MoEConfig, check_number
from .contract.routing import Router, mask_to_assignments


@dataclass
class ReMoEConfig(MoEConfig):
    note: ClassVar[str] = (
        "Refined L1 λ · mean_t Σ_e f_e R_te with f_e = E/(K·T) · #active tokens of e, reported as "
        "balance. λ starts at 1e-8 and is multiplied by 1.2^sign(1 − K/E − S) once per optimizer "
        "step, S the measured sparsity (Wang et al. 2025)."
    )
    dropless: ClassVar[str | None] = "remoe computes every expert with a positive gate"
    uneven_top_k: ClassVar[str | None] = "ReLU routing gives a token 0..E experts"
    variable_k: ClassVar[bool] = True
    num_experts: int = 8
    top_k: int = 1
    l1_coef_init: float = 1e-8
    l1_coef_rate: float = 1.2
    balance_refinement: bool = True

    def validate(self) -> None:
        super().validate()
        check_number(self, "l1_coef_init", positive=True)
        check_number(self, "l1_coef_rate", positive=True)
        if self.l1_coef_rate <= 1:
            raise ValueError(f"l1_coef_rate={self.l1_coef_rate} must be > 1 (alpha, Eq. 7)")
        if not isinstance(self.balance_refinement, bool):
            raise ValueError(
                f"balance_refinement={self.balance_refinement!r} must be true or false"
            )

    @property
    def target_sparsity(self) -> float:
        """S_target = 1 - K/E (Sec. 3.3)."""
        return 1.0 - self.top_k / self.num_experts


def l1_balance(gates_TE: torch.Tensor, top_k: int, refine: bool) -> torch.Tensor:
    """L_reg = mean_t sum_e f_e R_{t,e}, f_e = E/(K T) #active tokens of e, detached (Eq. 10)."""
    T, E = gates_TE.shape
    if not refine:
        return gates_TE.sum(-1).mean()
    f_E = (gates_TE.detach() > 0).sum(0).float() * E / (top_k * T)
    return (gates_TE * f_E).sum(-1).mean()


def next_l1_coef(coef: float, rate: float, target: float, sparsity: float) -> float:
    """lambda_{i+1} = lambda_i * alpha ** sign(S_target - S_i) (Eq. 7)."""
    sign = (target > sparsity) - (target < sparsity)
    return coef * rate**sign


class ReMoERouter(Router):
    def __init__(self, cfg: ReMoEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("l1_coef", torch.tensor(cfg.l1_coef_init, dtype=torch.float64))
        self.register_buffer("active_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("slot_count", torch.zeros((), dtype=torch.long), persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep `l1_coef` in float64 whatever the layer is cast to (it spans 1e-8 to ~1)."""
        coef = self.l1_coef
        super()._apply(fn, recurse)
        self._buffers["l1_coef"] = coef.to(device=self.l1_coef.device)
        return self

    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return F.relu(logits_TE)

    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg, E = self.cfg, self.cfg.num_experts
        logits_TE = self.logits(x_TD)
        gates_TE = F.relu(logits_TE)
        token_A, expert_A, weight_A = mask_to_assignments(gates_TE.detach() > 0, gates_TE)
        demand_E = torch.bincount(expert_A, minlength=E)
        routing = make_routing(token_A, expert_A, weight_A, gates_TE, logits_TE, demand_E)
        losses = {}
        if self.training:
            with torch.no_grad():
                self.active_count += expert_A.numel()
                self.slot_count += gates_TE.numel()
            reg = l1_balance(gates_TE, cfg.top_k, cfg.balance_refinement)
            losses["balance"] = self.l1_coef.to(reg.dtype) * reg
        return routing, losses

    def sparsity(self) -> float | None:
        """1 - active/(T E) over the training forwards since the last update, None if none."""
        slots = int(self.slot_count)
        return None if slots == 0 else 1.0 - int(self.active_count) / slots

    @torch.no_grad()
    def update_bias(self) -> None:
        """Once per optimizer step: the adaptive L1 coefficient update (Eq. 7)."""
        sparsity = self.sparsity()
        if sparsity is not None:
            cfg = self.cfg
            coef = next_l1_coef(
                float(self.l1_coef), cfg.l1_coef_rate, cfg.target_sparsity, sparsity
            )
            self.l1_coef.fill_(coef)
        self.active_count.zero_()
        self.slot_count.zero_()
