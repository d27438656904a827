"""The router base class and routing math shared by several variants.

Shape legend: T tokens, D model width, E routed experts, K experts per token,
A kept (token, expert) assignments, B sequences, S sequence length, G expert groups.

Every router turns `x_TD` into one `Routing` record (`variants.compute.assignments`: the only
thing that crosses from routing to expert compute) plus a dict of weighted losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.assignments import Routing, make_routing
from ..compute.dispatch import rank_in_expert
from .config import ROUTER_DTYPES, MoEConfig
from .router_grad import Rule, estimator_class

# ---------------------------------------------------------------------------------------------
# Assignment bookkeeping
# ---------------------------------------------------------------------------------------------


def topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of the last dim, largest first; equal values
    go to the lower index (docs/contract.md §2, tie-breaking).

    `torch.topk` leaves the order of ties unspecified (on CPU an 8-wide tie can come back as
    [5, 4]), and ties are common where routers start equal or round to bf16; a stable
    descending sort keeps equal values in index order, so a tie always resolves to the lower
    expert (or token) index, on every device and backend. Sorting E values costs no more than
    the routing around it at these widths.
    """
    sorted_values, order = values.sort(dim=-1, descending=True, stable=True)
    return sorted_values[..., :k], order[..., :k]


def flatten_topk(
    expert_TK: torch.Tensor, weight_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, K] choices -> token-major assignment lists (token_A, expert_A, weight_A), A = T*K."""
    T, K = expert_TK.shape
    token_A = torch.arange(T, device=expert_TK.device).repeat_interleave(K)
    return token_A, expert_TK.reshape(-1), weight_TK.reshape(-1)


def within_capacity(
    expert_A: torch.Tensor, priority_A: torch.Tensor, capacity: int, num_experts: int
) -> torch.Tensor:
    """Bool mask of assignments that fit: each expert keeps its `capacity` best-priority ones."""
    return rank_in_expert(expert_A, priority_A, num_experts) < capacity


def drop_over_capacity(
    token_A: torch.Tensor,
    expert_A: torch.Tensor,
    weight_A: torch.Tensor,
    priority_A: torch.Tensor,
    capacity: int | None,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per expert, the `capacity` assignments of lowest priority value; None keeps all."""
    if capacity is None:
        return token_A, expert_A, weight_A
    keep_A = within_capacity(expert_A, priority_A, capacity, num_experts)
    return token_A[keep_A], expert_A[keep_A], weight_A[keep_A]


def token_order_routing(
    expert_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    scores_TE: torch.Tensor,
    logits_TE: torch.Tensor,
    capacity: int | None,
) -> tuple[Routing, tuple[torch.Tensor, torch.Tensor]]:
    """[T, K] choices as a Routing, over-capacity assignments dropped in token order (earlier
    tokens, then a token's earlier choices, first; None keeps all). Also returns the demand
    (token_A, expert_A) before drops, which the balance losses' f counts."""
    T, K = expert_TK.shape
    E = scores_TE.shape[-1]
    token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK)
    demand_E = torch.bincount(expert_A, minlength=E)
    priority_A = torch.arange(T * K, device=expert_TK.device)
    kept = drop_over_capacity(token_A, expert_A, weight_A, priority_A, capacity, E)
    return make_routing(*kept, scores_TE, logits_TE, demand_E, capacity), (token_A, expert_A)


def uniform_choice(num_tokens: int, num_experts: int, k: int, device: torch.device) -> torch.Tensor:
    """Round-robin `expert_TK`: token t's j-th choice is (t*K + j) mod E (distinct when K <= E)."""
    t_T1 = torch.arange(num_tokens, device=device)[:, None]
    return (t_T1 * k + torch.arange(k, device=device)) % num_experts


def group_limited_mask(
    scores_TE: torch.Tensor, num_groups: int, topk_groups: int, per_group: int
) -> torch.Tensor:
    """Bool [T, E]: experts in each token's `topk_groups` best groups of contiguous experts.

    A group's score is the sum of its `per_group` highest scores (1 = its best expert, as in
    DeepSeek-V2's device-limited routing; K/topk_groups in DeepSeek-V3's node-limited routing).
    """
    T, E = scores_TE.shape
    grouped_TGe = scores_TE.view(T, num_groups, E // num_groups)
    group_score_TG = topk(grouped_TGe, per_group)[0].sum(-1)
    best_TG = topk(group_score_TG, topk_groups)[1]
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=scores_TE.device)
    keep_TG.scatter_(1, best_TG, True)
    return keep_TG.repeat_interleave(E // num_groups, dim=1)


# ---------------------------------------------------------------------------------------------
# Losses (weights are applied by the caller, so every term's coefficient is visible there)
# ---------------------------------------------------------------------------------------------


def f_dot_p(f_E: torch.Tensor, p_E: torch.Tensor) -> torch.Tensor:
    """The `sum_i f_i P_i` form shared by Switch, GShard, DeepSeekMoE, V2, V3 and Mixtral.

    Works on trailing dims, so a per-sequence `[B, E]` pair gives `[B]` (callers average).
    """
    return (f_E * p_E).sum(-1)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, Eq. 5): mean_t logsumexp(u_t)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def count_per_sequence(
    expert_A: torch.Tensor, token_A: torch.Tensor, num_seqs: int, seq_len: int, num_experts: int
) -> torch.Tensor:
    """[B, E] count of assignments per (sequence, expert); tokens are flattened as b*S + s."""
    seq_A = torch.div(token_A, seq_len, rounding_mode="floor")
    flat = torch.bincount(seq_A * num_experts + expert_A, minlength=num_seqs * num_experts)
    return flat.view(num_seqs, num_experts)


# ---------------------------------------------------------------------------------------------
# Router base
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Expert centroids `weight [E, D]`; logits `u = x @ weight.T` in `router_dtype` (fp32).

    Subclasses implement `route(x_TD, num_seqs) -> (Routing, losses)` and, where their
    affinities are not a softmax, `score(logits_TE)`. A router whose config sets
    `uses_token_ids` implements `route(x_TD, num_seqs, token_ids)` instead (token_ids [T] long,
    or None when the caller gave none). The base handles force_uniform_routing and drops losses
    in eval mode (docs/contract.md §2: eval forwards return no losses).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = ROUTER_DTYPES[cfg.router_dtype]
        # router replay: (token_A, expert_A, weight_A) to use instead of routing (`replay`)
        self.forced: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        # nn.Linear's default init: centroids of norm ~1 at any width.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def centroid(self, expert: int) -> torch.Tensor:
        """[D]: the input-space direction that raises `expert`'s logit most (its centroid)."""
        return self.weight[expert]

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # autocast would recast this matmul to bf16: the router keeps its own dtype
        with torch.autocast(x_TD.device.type, enabled=False):
            return x_TD.to(self.dtype) @ self.weight.to(self.dtype).T

    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits_TE, dim=-1)

    def route(self, x_TD: torch.Tensor, num_seqs: int) -> tuple[Routing, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def select(self, logits_TE: torch.Tensor, rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_TK, expert_TK): the variant's own top-K `rule` (called with no argument),
        unless its `router_grad` estimator selects itself (SparseMixer, from `logits_TE`).
        A variant whose config leaves `no_sparsemixer` None selects through here."""
        return estimator_class(self.cfg).select(self.cfg, logits_TE, rule, self.training)

    def counted(self, expert_TK: torch.Tensor, rule: Rule) -> torch.Tensor:
        """[T, K]: the choices the balance loss's f counts: `expert_TK` from `select`, or the
        `rule`'s where the estimator selects itself (SparseMixer: not its samples)."""
        return estimator_class(self.cfg).counted(expert_TK, rule)

    def forward(
        self, x_TD: torch.Tensor, num_seqs: int = 1, token_ids: torch.Tensor | None = None
    ) -> tuple[Routing, dict[str, torch.Tensor]]:
        if self.forced is not None:
            return self.replayed(x_TD), {}
        if self.cfg.force_uniform_routing:
            return self.uniform(x_TD, num_seqs), {}
        if self.cfg.uses_token_ids:
            routing, losses = self.route(x_TD, num_seqs, flatten_ids(token_ids, x_TD.shape[0]))
        else:
            routing, losses = self.route(x_TD, num_seqs)
        return routing, (losses if self.training else {})

    def uniform(self, x_TD: torch.Tensor, num_seqs: int = 1) -> Routing:
        """Round-robin routing with weight 1/K, for timing kernels apart from imbalance.

        `num_seqs` is for routers whose round robin follows the sequences (expert choice's
        position scope); this one ignores it.

        The router's logits are still computed so its cost stays in the timing. Capacity,
        when set, is applied in token order.
        """
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        scores_TE = self.score(logits_TE)
        T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
        expert_TK = uniform_choice(T, E, K, x_TD.device)
        weight_TK = torch.full((T, K), 1.0 / K, dtype=scores_TE.dtype, device=x_TD.device)
        return token_order_routing(expert_TK, weight_TK, scores_TE, logits_TE, cfg.capacity(T))[0]

    def replay(self, assignments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """Router replay: route every following forward by the given (token_A, expert_A,
        weight_A) instead of deciding (None routes again). docs/contract.md §2, replay."""
        if assignments is None:
            self.forced = None
            return
        token_A, expert_A, weight_A = (torch.as_tensor(a) for a in assignments)
        E = self.cfg.num_experts
        if not (len(token_A) == len(expert_A) == len(weight_A)):
            raise ValueError(
                f"replayed assignments differ in length: token {len(token_A)}, expert "
                f"{len(expert_A)}, weight {len(weight_A)}"
            )
        if len(expert_A) and (int(expert_A.min()) < 0 or int(expert_A.max()) >= E):
            raise ValueError(
                f"replayed expert ids {int(expert_A.min())}..{int(expert_A.max())} must be in "
                f"0..{E - 1} (num_experts={E})"
            )
        self.forced = (token_A.long(), expert_A.long(), weight_A.float())

    def replayed(self, x_TD: torch.Tensor) -> Routing:
        """The forced assignments as this forward's Routing: the recorded combine weights, the
        router's own logits and scores (for statistics); no losses, no state counted."""
        token_A, expert_A, weight_A = (a.to(x_TD.device) for a in self.forced)
        T = x_TD.shape[0]
        if len(token_A) and (int(token_A.min()) < 0 or int(token_A.max()) >= T):
            raise ValueError(
                f"replayed token ids {int(token_A.min())}..{int(token_A.max())} must be in "
                f"0..{T - 1} (this forward has {T} tokens)"
            )
        logits_TE = self.logits(x_TD)
        scores_TE = self.score(logits_TE)
        demand_E = torch.bincount(expert_A, minlength=self.cfg.num_experts)
        return make_routing(token_A, expert_A, weight_A, scores_TE, logits_TE, demand_E)

    def update_bias(self) -> None:
        """Loss-free balancing hook (DeepSeek-V3); a no-op for routers without a bias."""


# ---------------------------------------------------------------------------------------------
# Variable-k routings (topp, remoe, moe_plus_plus, expert_choice)
# ---------------------------------------------------------------------------------------------


def flatten_ids(token_ids: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """`token_ids` of any leading shape -> [T] long; None stays None (the router decides)."""
    if token_ids is None:
        return None
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids dtype={token_ids.dtype} must be an integer dtype")
    if token_ids.numel() != num_tokens:
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} holds {token_ids.numel()} ids; it must "
            f"hold one per token of x ({num_tokens}), e.g. [B, S] for x [B, S, D]"
        )
    return token_ids.reshape(-1).long()


def mask_to_assignments(
    keep_TE: torch.Tensor, weight_TE: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bool [T, E] selection -> token-major (token_A, expert_A, weight_A), weight from weight_TE."""
    token_A, expert_A = keep_TE.nonzero(as_tuple=True)
    return token_A, expert_A, weight_TE[token_A, expert_A]


# affinity s = f(u) of the routers that pick top-K of s (+ a bias) and weigh by s: Eq. 15 of
# DeepSeek-V3 (sigmoid), softmax over the experts, and DeepSeek-V4's sqrt(softplus(u))
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "softmax": lambda u: F.softmax(u, dim=-1),
    "sqrtsoftplus": lambda u: F.softplus(u).sqrt(),
}


def norm_topk(weight_TK: torch.Tensor, enabled: bool) -> torch.Tensor:
    """`norm_topk_prob` (Qwen2-MoE, DeepSeek-V3): the K selected weights rescaled to sum to 1."""
    return weight_TK / weight_TK.sum(-1, keepdim=True) if enabled else weight_TK


# ---------------------------------------------------------------------------------------------
# Balance scope (micro_batch, sequence, global_batch): f_i counted over which tokens
# ---------------------------------------------------------------------------------------------


def assignment_share(counts: torch.Tensor) -> torch.Tensor:
    """f_i = counts_i / sum_j counts_j on the last dim (0 where nothing was counted).

    Every balance loss of the suite is `c * sum_i f_i P_i` with f_i a share of assignments times
    a constant (Switch: 1; DeepSeekMoE/V2/V3: E, since E/(K T) * count = E * share).
    """
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def scoped_balance_inputs(
    router: nn.Module,
    expert_A: torch.Tensor,
    token_A: torch.Tensor,
    probs_TE: torch.Tensor,
    num_seqs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, P) for `sum_i f_i P_i` in the router's `cfg.balance_scope`: [E] pairs, or [B, E]
    per sequence (callers take `f_dot_p(f, P).mean()`).

    `expert_A`/`token_A` are the assignments the variant counts (demand, before drops).
    global_batch (Qiu et al. 2025, Sec. 3): f counts every training forward since the last
    `update_bias()` (this one included), all-reduced over data-parallel ranks when
    torch.distributed is initialised: the running form of Megatron-Core's `global_aux_loss`.
    A runner that knows the step's exact counts beforehand (e.g. from a no-grad pass over
    all its micro-batches) fixes them with `set_balance_counts`; both reset at `update_bias()`.
    """
    scope = router.cfg.balance_scope
    T, E = probs_TE.shape
    if scope == "sequence":
        S = T // num_seqs
        counts_BE = count_per_sequence(expert_A, token_A, num_seqs, S, E).float()
        return assignment_share(counts_BE), probs_TE.view(num_seqs, S, E).mean(1)
    counts_E = torch.bincount(expert_A, minlength=E).float()
    if scope == "global_batch":
        counts_E = global_counts(router, counts_E)
    return assignment_share(counts_E), probs_TE.mean(0)


def global_counts(router: nn.Module, counts_E: torch.Tensor) -> torch.Tensor:
    """The step's counts so far, this forward's included, summed over data-parallel ranks."""
    fixed = getattr(router, "fixed_balance_counts", None)
    if fixed is not None:
        return fixed.to(counts_E)
    with torch.no_grad():
        local_E = counts_E.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(local_E)
        total = getattr(router, "balance_counts", None)
        if total is None or total.shape != local_E.shape:
            total = torch.zeros_like(local_E)
        router.balance_counts = total + local_E
    return router.balance_counts.clone()


def scoped_balance_loss(
    router: nn.Module,
    expert_A: torch.Tensor,
    token_A: torch.Tensor,
    probs_TE: torch.Tensor,
    num_seqs: int,
) -> torch.Tensor:
    """`E * sum_i f_i P_i` in the router's balance scope (1 under perfect balance), averaged
    over sequences where the scope is per sequence; callers multiply their coefficient."""
    share, p = scoped_balance_inputs(router, expert_A, token_A, probs_TE, num_seqs)
    return probs_TE.shape[-1] * f_dot_p(share, p).mean()


def set_balance_counts(router: nn.Module, counts_E: torch.Tensor | None) -> None:
    """Fix the global-batch counts f is computed from until the next `update_bias()`; these
    are the caller's final counts (already summed over micro-batches and ranks)."""
    router.fixed_balance_counts = None if counts_E is None else counts_E.detach().float()


def reset_balance_counts(router: nn.Module) -> None:
    """Forget the step's global-batch counts (the layer's `update_bias()` calls it)."""
    router.balance_counts = None
    router.fixed_balance_counts = None


def sync_step_counts(
    module: nn.Module, group: torch.distributed.ProcessGroup | None = None
) -> None:
    """Sum a module's step counts over `group`: its integer buffers, which the contract reserves
    for what training forwards counted since the last `update_bias()` (DeepSeek-V3's
    `load_count`, ReMoE's `active_count` and `slot_count`; docs/contract.md §2). Data- and
    expert-parallel runs call it before `update_bias()`, so every rank updates from the
    whole batch."""
    for buf in module.buffers():
        if not buf.is_floating_point() and not buf.is_complex() and buf.dtype != torch.bool:
            torch.distributed.all_reduce(buf, group=group)
