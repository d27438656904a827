"""Dropless grouped dispatch on CPU: the two GEMM halves of an expert FFN as autograd Functions.

Shape legend: T tokens, D model width, H expert hidden width, E experts, A kept assignments,
R rows of the dispatch layout (A, or sum over groups of G*C when padded), C rows per expert of a
padded group, G experts of one GEMM group, N rows of one group.

    h_RH = GatherMM(x_TD, rows, w1_EDH)                          # h[r] = x[token[r]] @ w1[e(r)]
    y_TD = WeightedMMScatter(act(h_RH), weight_R, w2_EHD, rows)  # y[t] = sum_r w[r] act[r] @ w2

Two layouts of the rows (`ExpertRows.path` says which one a call used):
- "per_expert": the A assignments sorted by expert, one GEMM per non-empty expert on its row
  slice (`torch.mm`). No padding; costs a few ops per expert in forward and backward.
- "padded_bmm": experts run in consecutive groups of G (about GROUP_ROWS rows each), one
  `torch.bmm` per group and projection: about K groups per step instead of E experts, at the
  price of GEMM work on pad rows. Each expert of a group owns C rows, C the largest load in
  that group, not in the whole layer (the quick benchmark size, T=2048 E=64 K=8 with a fresh
  router: 17% pad rows padded to the layer's largest load, 7% to each group's; forward+backward
  3-5% faster, interleaved); the pad rows point at token 0 with combine weight 0 (so they add
  exact zeros to outputs and gradients).
`dispatch_layout` chooses per call by a measured cost rule (`padded_rows_cheaper`, constants
below).

Why custom Functions instead of `x_TD[token_A]` + `grouped_mm` (profiled with torch.profiler,
forward+backward, T=4096, D=512, E=64, H=128, K=8, 2 threads):
- The gathered copy `x_AD` and the expert outputs `out_AD` are [A, D] = K times the input. Here
  each group gathers its N rows right before its GEMM (cache-hot, [N, D]) and regathers them in
  backward; nothing [A, D] is allocated or saved, so the saved activations are the [R, H] hidden
  ones, as in a dense FFN.
- The combine weight scales the [R, H] input of the second projection instead of its [R, D]
  output (`(w * a) @ W2 == w * (a @ W2)`): a quarter of the elementwise traffic at H = D / 4.
  It is applied once over all rows (not per expert), and its gradient is one rowwise dot.
- On CPU `grouped_mm` loops over experts internally; `torch.mm`/`torch.bmm` on contiguous row
  slices run the same GEMMs and write them in place (`out=`).
The GEMMs and sums are those of the `loop` reference, up to floating-point summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PER_EXPERT, PADDED_BMM = "per_expert", "padded_bmm"
Group = tuple[int, int, int]  # (first expert, end expert, rows per expert C)
Bounds = tuple[int, int, int, int]  # (first expert, end expert, start row, stop row)
PATHS = (PER_EXPERT, PADDED_BMM)

# The selection rule, tuned on 2 AMD EPYC threads, fp32, forward+backward: one expert costs
# about PER_EXPERT_OPS ops of ~OP_SECONDS of dispatch each on the per-expert path, while a pad
# row costs the GEMM FLOPs of a real row (3 GEMMs per projection in fwd+bwd) at about
# FLOP_SECONDS each. Pad when the padding is cheaper than the per-expert dispatch it saves.
# `scripts/dispatch_cost.py` measures both costs at the quick size (interleaved, one process);
# its committed output is reports/benchmarks/dispatch_cost.txt (a run on a shared machine, too
# noisy to confirm or retune the constants: rerun it idle before changing them).
OP_SECONDS = 12e-6
PER_EXPERT_OPS = 14
FLOP_SECONDS = 1 / 40e9
# rows of one bmm group. Its [N, D] and [N, H] temporaries live next to the weight gradients in
# backward; at 1024 the padded path's peak step memory stays at or below the per-expert path's
# (LiveTensorBytes, quick and T=4096 sizes: 15.3 vs 16.5 MiB, 123 vs 126 MiB); 2048 and 4096
# were 2-8% and 25% above it.
GROUP_ROWS = 1024


@dataclass(frozen=True)
class ExpertRows:
    """The dispatch layout: per GEMM group its experts, row slice and token indices.

    `groups` holds (first expert, end expert, start row, stop row); a group of G experts owns
    G*C rows (padded) or one expert's load (per expert). Pad rows have token 0 and weight 0.
    """

    token_R: torch.Tensor  # [R] long, token of each row
    groups: tuple[Bounds, ...]
    tokens: tuple[torch.Tensor, ...]  # token_R[start:stop] of each group
    num_tokens: int
    path: str = PER_EXPERT

    @classmethod
    def from_groups(
        cls, token_R: torch.Tensor, groups: list[Bounds], num_tokens: int, path: str
    ) -> ExpertRows:
        """The layout of rows `token_R` cut into `groups` (the bounds of `group_rows`)."""
        tokens = tuple(token_R[a:b] for _, _, a, b in groups)
        return cls(token_R, tuple(groups), tokens, num_tokens, path)

    @classmethod
    def from_counts(cls, token_A: torch.Tensor, counts: list[int], num_tokens: int) -> ExpertRows:
        """Per-expert layout from assignments sorted by expert and the load of each expert:
        each expert a group of its own, owning exactly its load."""
        bounds, _, _ = group_rows([(e, e + 1, n) for e, n in enumerate(counts)])
        return cls.from_groups(token_A, bounds, num_tokens, PER_EXPERT)

    def weight_grad(self, w_EXY: torch.Tensor) -> torch.Tensor:
        """A weight-gradient buffer: the loops write each grouped expert; zero the rest."""
        grad_EXY = torch.empty_like(w_EXY)
        busy = set()
        for e0, e1, _, _ in self.groups:
            busy.update(range(e0, e1))
        for e in range(w_EXY.shape[0]):
            if e not in busy:
                grad_EXY[e].zero_()
        return grad_EXY


def padded_groups(counts: list[int]) -> list[Group]:
    """(first expert, end expert, rows per expert C) of each bmm group of the padded layout:
    consecutive experts, G = GROUP_ROWS // (largest load) of them a group (at least 1; so no
    group's temporaries pass GROUP_ROWS rows unless one expert's load alone does), each padded
    to the largest load within the group."""
    E = len(counts)
    per_group = max(1, GROUP_ROWS // max(max(counts, default=0), 1))
    return [
        (e0, min(e0 + per_group, E), max(counts[e0 : e0 + per_group]))
        for e0 in range(0, E, per_group)
    ]


def group_rows(groups: list[Group]) -> tuple[list[Bounds], list[int], int]:
    """Groups (first expert, end expert, rows per expert C) laid out one after another, each
    expert owning C rows: (bounds (first expert, end expert, start row, stop row) of every
    non-empty group, each expert's first row, all rows R)."""
    bounds, row_E, R = [], [], 0
    for e0, e1, C in groups:
        row_E += range(R, R + (e1 - e0) * C, C) if C else [R] * (e1 - e0)
        if C:
            bounds.append((e0, e1, R, R + (e1 - e0) * C))
        R += (e1 - e0) * C
    return bounds, row_E, R


# torch's CPU sort of an integer tensor switches to a radix sort at this many elements; below
# PAD_TO_RADIX_MIN keys the plain sort is faster than the padded one (4096 keys: 0.065 against
# 0.10 ms; 6000: 0.12 against 0.08)
RADIX_SORT_MIN = 1 << 15
PAD_TO_RADIX_MIN = 5000


def expert_order(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The stable order of assignments by expert, `argsort(expert_A, stable=True)`.

    On the 2-core dev box (torch 2.13 CPU) a stable argsort of 16384 int keys took 0.69 ms and
    of 32768 keys 0.10 ms: at 2**15 elements torch switches to a radix sort. So a short list of
    uint8 keys (from PAD_TO_RADIX_MIN up) is padded up to that size with a key larger than every
    expert's; being largest, the pad sorts last and the first A positions are the answer.
    """
    A = expert_A.numel()
    if expert_A.is_cuda or num_experts > 255 or A < PAD_TO_RADIX_MIN:
        return torch.argsort(expert_A, stable=True)
    keys = expert_A.to(torch.uint8)
    if A < RADIX_SORT_MIN:
        keys = torch.cat([keys, keys.new_full((RADIX_SORT_MIN - A,), num_experts)])
    return torch.argsort(keys, stable=True)[:A]


def rank_in_expert(
    expert_A: torch.Tensor, priority_A: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Position of each assignment in its expert's queue when served in ascending priority.

    Ties in priority keep list order (stable sorts), so `priority_A = arange(A)` is "first come,
    first served" in list order.
    """
    A = expert_A.numel()
    order_A = torch.argsort(priority_A, stable=True)
    # a stable sort by expert keeps the priority order inside each expert's group
    by_expert_A = order_A[expert_order(expert_A[order_A], num_experts)]
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted_A = torch.arange(A, device=expert_A.device) - starts_E[expert_A[by_expert_A]]
    rank_A = torch.empty_like(rank_sorted_A)
    rank_A[by_expert_A] = rank_sorted_A
    return rank_A


def _bmm(a_NX: torch.Tensor, w_GXY: torch.Tensor, out_NY: torch.Tensor | None = None):
    """[N, X] rows of G experts (N = G*C) times their [G, X, Y] weights -> [N, Y]."""
    G = w_GXY.shape[0]
    if G == 1:
        return torch.mm(a_NX, w_GXY[0], out=out_NY)
    a_GCX = a_NX.view(G, -1, a_NX.shape[-1])
    if out_NY is None:
        return torch.bmm(a_GCX, w_GXY).view(-1, w_GXY.shape[-1])
    torch.bmm(a_GCX, w_GXY, out=out_NY.view(G, -1, out_NY.shape[-1]))
    return out_NY


def _baddbmm_(out_NY: torch.Tensor, a_NX: torch.Tensor, w_GXY: torch.Tensor) -> None:
    """`out += a @ w` per expert, in place."""
    G = w_GXY.shape[0]
    if G == 1:
        out_NY.addmm_(a_NX, w_GXY[0])
        return
    out_NY.view(G, -1, out_NY.shape[-1]).baddbmm_(a_NX.view(G, -1, a_NX.shape[-1]), w_GXY)


def _bmm_tn(a_NX: torch.Tensor, b_NY: torch.Tensor, out_GXY: torch.Tensor) -> None:
    """Per expert a^T b over its rows, written into the [G, X, Y] weight-gradient slice."""
    G = out_GXY.shape[0]
    if G == 1:
        torch.mm(a_NX.T, b_NY, out=out_GXY[0])
        return
    a_GCX = a_NX.view(G, -1, a_NX.shape[-1])
    torch.bmm(a_GCX.transpose(1, 2), b_NY.view(G, -1, b_NY.shape[-1]), out=out_GXY)


class GatherMM(torch.autograd.Function):
    """`h_i[r] = x[token[r]] @ w_i[expert of r]` for each weight w_i, one gather per group.

    Several weights share the gather (swiglu's w1 and w3), and in backward their input
    gradients sum before one scatter.
    """

    @staticmethod
    def forward(ctx, x_TD, rows, *w_EDH):  # type: ignore[override]
        R = rows.token_R.numel()
        h_RH = tuple(x_TD.new_empty(R, w.shape[-1]) for w in w_EDH)
        for (e0, e1, a, b), token_N in zip(rows.groups, rows.tokens):
            x_ND = x_TD.index_select(0, token_N)
            for w, h in zip(w_EDH, h_RH):
                _bmm(x_ND, w[e0:e1], h[a:b])
        ctx.save_for_backward(x_TD, *w_EDH)
        ctx.rows = rows
        return h_RH

    @staticmethod
    def backward(ctx, *grad_h_RH):  # type: ignore[override]
        x_TD, *w_EDH = ctx.saved_tensors
        rows: ExpertRows = ctx.rows
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        grad_h_RH = [g.contiguous() for g in grad_h_RH]
        grad_x_TD = torch.zeros_like(x_TD) if need_x else None
        grad_w = [rows.weight_grad(w) if need else None for w, need in zip(w_EDH, need_w)]
        w_T = [w.transpose(1, 2) for w in w_EDH]
        for (e0, e1, a, b), token_N in zip(rows.groups, rows.tokens):
            if any(need_w):
                x_ND = x_TD.index_select(0, token_N)
                for g_w, g_h in zip(grad_w, grad_h_RH):
                    if g_w is not None:
                        _bmm_tn(x_ND, g_h[a:b], g_w[e0:e1])
            if need_x:
                grad_x_ND = _bmm(grad_h_RH[0][a:b], w_T[0][e0:e1])
                for wt, g_h in zip(w_T[1:], grad_h_RH[1:]):
                    _baddbmm_(grad_x_ND, g_h[a:b], wt[e0:e1])
                grad_x_TD.index_add_(0, token_N, grad_x_ND)
        return grad_x_TD, None, *grad_w


class WeightedMMScatter(torch.autograd.Function):
    """`y[t] = sum over r with token[r] = t of weight[r] * (h[r] @ w[expert of r])`.

    The combine weight scales the [R, H] input rows rather than the [R, D] output rows.
    """

    @staticmethod
    def forward(ctx, h_RH, weight_R, w_EHD, rows):  # type: ignore[override]
        weight_R1 = weight_R[:, None]
        y_TD = h_RH.new_zeros(rows.num_tokens, w_EHD.shape[-1])
        for (e0, e1, a, b), token_N in zip(rows.groups, rows.tokens):
            y_TD.index_add_(0, token_N, _bmm(h_RH[a:b] * weight_R1[a:b], w_EHD[e0:e1]))
        ctx.save_for_backward(h_RH, weight_R, w_EHD)
        ctx.rows = rows
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):  # type: ignore[override]
        h_RH, weight_R, w_EHD = ctx.saved_tensors
        rows: ExpertRows = ctx.rows
        need_h, need_weight, need_w = ctx.needs_input_grad[:3]
        grad_y_TD = grad_y_TD.contiguous()
        weight_R1 = weight_R[:, None]
        w_T = w_EHD.transpose(1, 2)
        # every row belongs to a group, so the loop writes all of these
        grad_hw_RH = torch.empty_like(h_RH)
        grad_w_EHD = rows.weight_grad(w_EHD) if need_w else None
        for (e0, e1, a, b), token_N in zip(rows.groups, rows.tokens):
            grad_y_ND = grad_y_TD.index_select(0, token_N)
            if need_w:
                # per group, not over all rows: no [R, H] temporary next to the gradients
                _bmm_tn(h_RH[a:b] * weight_R1[a:b], grad_y_ND, grad_w_EHD[e0:e1])
            _bmm(grad_y_ND, w_T[e0:e1], grad_hw_RH[a:b])
        grad_weight_R = None
        if need_weight:  # rowwise dots in blocks: no [R, H] product next to the gradients
            grad_weight_R = weight_R.new_empty(weight_R.shape)
            for s in range(0, h_RH.shape[0], GROUP_ROWS):
                torch.linalg.vecdot(
                    grad_hw_RH[s : s + GROUP_ROWS],
                    h_RH[s : s + GROUP_ROWS],
                    out=grad_weight_R[s : s + GROUP_ROWS],
                )
        grad_h_RH = grad_hw_RH.mul_(weight_R1) if need_h else None
        return grad_h_RH, grad_weight_R, grad_w_EHD, None


def _act_forward(activation: str, h1: torch.Tensor, h3: torch.Tensor | None):
    """(act, silu(h1) for swiglu else None): the bank's activation on one group's rows."""
    if activation == "gelu":
        return torch.nn.functional.gelu(h1), None
    s = torch.nn.functional.silu(h1)
    return s * h3, s


class ExpertFFN(torch.autograd.Function):
    """The whole routed FFN of every group in one Function (the padded_bmm path):
    `y[t] = sum over r with token[r] = t of weight[r] * act(x[t] @ w1, x[t] @ w3) @ w2`.

    Only the [R, H] projections h1 (and h3) are saved; the activation and its weighted copy are
    recomputed per group in backward, and every other [N, *] temporary lives for one group. So
    the padded rows' extra hidden activations are paid for by not saving act(h) and silu(h1)
    (two [R, H] tensors the two-Function path keeps) nor holding [R, H] gradients.
    Activations: "gelu" (exact erf) and "swiglu", with their aten backward kernels.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_R, rows, activation, w1_EDH, w2_EHD, w3_EDH):  # type: ignore[override]
        R, H = rows.token_R.numel(), w1_EDH.shape[-1]
        h1_RH = x_TD.new_empty(R, H)
        h3_RH = x_TD.new_empty(R, H) if w3_EDH is not None else None
        weight_R1 = weight_R[:, None]
        y_TD = x_TD.new_zeros(rows.num_tokens, w2_EHD.shape[-1])
        for (e0, e1, a, b), token_N in zip(rows.groups, rows.tokens):
            x_ND = x_TD.index_select(0, token_N)
            h1 = _bmm(x_ND, w1_EDH[e0:e1], h1_RH[a:b])
            h3 = _bmm(x_ND, w3_EDH[e0:e1], h3_RH[a:b]) if h3_RH is not None else None
            del x_ND
            act_NH = _act_forward(activation, h1, h3)[0].mul_(weight_R1[a:b])
            y_TD.index_add_(0, token_N, _bmm(act_NH, w2_EHD[e0:e1]))
        ctx.save_for_backward(x_TD, weight_R, w1_EDH, w2_EHD, w3_EDH, h1_RH, h3_RH)
        ctx.rows, ctx.activation = rows, activation
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):  # type: ignore[override]
        x_TD, weight_R, w1_EDH, w2_EHD, w3_EDH, h1_RH, h3_RH = ctx.saved_tensors
        rows: ExpertRows = ctx.rows
        need_x, need_weight, _, _, need_w1, need_w2, need_w3 = ctx.needs_input_grad
        grad_y_TD = grad_y_TD.contiguous()
        weight_R1 = weight_R[:, None]
        grad_x_TD = torch.zeros_like(x_TD) if need_x else None
        grad_weight_R = torch.empty_like(weight_R) if need_weight else None
        grad_w1 = rows.weight_grad(w1_EDH) if need_w1 else None
        grad_w2 = rows.weight_grad(w2_EHD) if need_w2 else None
        grad_w3 = rows.weight_grad(w3_EDH) if need_w3 else None
        w1_T, w2_T = w1_EDH.transpose(1, 2), w2_EHD.transpose(1, 2)
        w3_T = w3_EDH.transpose(1, 2) if w3_EDH is not None else None
        for (e0, e1, a, b), token_N in zip(rows.groups, rows.tokens):
            h1 = h1_RH[a:b]
            h3 = h3_RH[a:b] if h3_RH is not None else None
            act_NH, silu_NH = _act_forward(ctx.activation, h1, h3)
            grad_y_ND = grad_y_TD.index_select(0, token_N)
            if need_w2:
                _bmm_tn(act_NH * weight_R1[a:b], grad_y_ND, grad_w2[e0:e1])
            grad_aw_NH = _bmm(grad_y_ND, w2_T[e0:e1])
            del grad_y_ND  # at most one [N, D] temporary at a time from here
            if need_weight:
                torch.linalg.vecdot(grad_aw_NH, act_NH, out=grad_weight_R[a:b])
            del act_NH
            grad_act_NH = grad_aw_NH.mul_(weight_R1[a:b])
            if h3 is None:
                grad_h1 = torch.ops.aten.gelu_backward(grad_act_NH, h1)
                grad_h3 = None
            else:
                grad_h3 = grad_act_NH * silu_NH
                grad_h1 = torch.ops.aten.silu_backward(grad_act_NH.mul_(h3), h1)
            del grad_act_NH, silu_NH
            if need_w1 or need_w3:
                x_ND = x_TD.index_select(0, token_N)
                if need_w1:
                    _bmm_tn(x_ND, grad_h1, grad_w1[e0:e1])
                if need_w3:
                    _bmm_tn(x_ND, grad_h3, grad_w3[e0:e1])
                del x_ND
            if need_x:
                grad_x_ND = _bmm(grad_h1, w1_T[e0:e1])
                if grad_h3 is not None:
                    _baddbmm_(grad_x_ND, grad_h3, w3_T[e0:e1])
                grad_x_TD.index_add_(0, token_N, grad_x_ND)
        return grad_x_TD, grad_weight_R, None, None, grad_w1, grad_w2, grad_w3
