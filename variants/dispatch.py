"""Dropless grouped dispatch on CPU: the two GEMM halves of an expert FFN as autograd Functions.

Shape legend: T tokens, D model width, H expert hidden width, E experts, A kept assignments
sorted by expert (expert e owns the rows `start:stop` of its `ExpertRows` entry), N rows of one
expert.

    h_AH = GatherMM(x_TD, rows, w1_EDH)                       # h[a] = x[token[a]] @ w1[e(a)]
    y_TD = WeightedMMScatter(act(h_AH), weight_A, w2_EHD, rows)  # y[t] = sum_a w[a] act[a] @ w2

Why custom Functions instead of `x_TD[token_A]` + `torch.nn.functional.grouped_mm` (profiled
with torch.profiler, forward+backward, T=4096, D=512, E=64, H=128, K=8, 2 threads):
- The gathered copy `x_AD` and the expert outputs `out_AD` are [A, D] = K times the input. The
  plain version materialised both (64 MiB each here, above glibc's 32 MiB mmap threshold, so
  every step page-faults them in afresh), saved them for backward, and paid an [A, D] zero-init
  plus a serial accumulate (`index_put_`) for the gather's gradient. Here each expert gathers
  its N rows right before its GEMM (cache-hot, [N, D]) and regathers them in backward; nothing
  [A, D] is allocated, so the saved activations are the [A, H] hidden ones, as in a dense FFN.
- The combine weight scales the [A, H] input of the second projection instead of its [A, D]
  output (`(w * a) @ W2 == w * (a @ W2)`): a quarter of the elementwise traffic at H = D / 4.
- On CPU `grouped_mm` loops over experts internally; a Python loop of `torch.mm` on contiguous
  row slices runs the same GEMMs, writes them in place (`out=`), and costs ~10 us per op.
The GEMMs and sums are those of the `loop` reference, up to floating-point summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertRows:
    """Assignments sorted by expert: the row slice and token indices of each non-empty expert."""

    token_A: torch.Tensor  # [A] long, token of each sorted assignment
    slices: tuple[tuple[int, int, int], ...]  # (expert, start, stop) of non-empty experts
    tokens: tuple[torch.Tensor, ...]  # token_A[start:stop] of each entry of `slices`
    num_tokens: int

    @classmethod
    def from_counts(cls, token_A: torch.Tensor, counts: list[int], num_tokens: int) -> ExpertRows:
        slices, start = [], 0
        for e, n in enumerate(counts):
            if n:
                slices.append((e, start, start + n))
            start += n
        tokens = tuple(token_A[a:b] for _, a, b in slices)
        return cls(token_A, tuple(slices), tokens, num_tokens)

    def weight_grad(self, w_EXY: torch.Tensor) -> torch.Tensor:
        """A weight-gradient buffer: the loops write each non-empty expert; zero the rest."""
        grad_EXY = torch.empty_like(w_EXY)
        busy = {e for e, _, _ in self.slices}
        for e in range(w_EXY.shape[0]):
            if e not in busy:
                grad_EXY[e].zero_()
        return grad_EXY


class GatherMM(torch.autograd.Function):
    """`h_i[a] = x[token[a]] @ w_i[expert of a]` for each weight w_i, one gather per expert.

    Several weights share the gather (swiglu's w1 and w3), and in backward their input
    gradients sum before one scatter.
    """

    @staticmethod
    def forward(ctx, x_TD, rows, *w_EDH):  # type: ignore[override]
        A = rows.token_A.numel()
        h_AH = tuple(x_TD.new_empty(A, w.shape[-1]) for w in w_EDH)
        for (e, a, b), token_N in zip(rows.slices, rows.tokens):
            x_ND = x_TD.index_select(0, token_N)
            for w, h in zip(w_EDH, h_AH):
                torch.mm(x_ND, w[e], out=h[a:b])
        ctx.save_for_backward(x_TD, *w_EDH)
        ctx.rows = rows
        return h_AH

    @staticmethod
    def backward(ctx, *grad_h_AH):  # type: ignore[override]
        x_TD, *w_EDH = ctx.saved_tensors
        rows: ExpertRows = ctx.rows
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        grad_h_AH = [g.contiguous() for g in grad_h_AH]
        grad_x_TD = torch.zeros_like(x_TD) if need_x else None
        grad_w = [rows.weight_grad(w) if need else None for w, need in zip(w_EDH, need_w)]
        for (e, a, b), token_N in zip(rows.slices, rows.tokens):
            if any(need_w):
                x_ND = x_TD.index_select(0, token_N)
                for g_w, g_h in zip(grad_w, grad_h_AH):
                    if g_w is not None:
                        torch.mm(x_ND.T, g_h[a:b], out=g_w[e])
            if need_x:
                grad_x_ND = grad_h_AH[0][a:b] @ w_EDH[0][e].T
                for w, g_h in zip(w_EDH[1:], grad_h_AH[1:]):
                    grad_x_ND.addmm_(g_h[a:b], w[e].T)
                grad_x_TD.index_add_(0, token_N, grad_x_ND)
        return grad_x_TD, None, *grad_w


class WeightedMMScatter(torch.autograd.Function):
    """`y[t] = sum over a with token[a] = t of weight[a] * (h[a] @ w[expert of a])`.

    The combine weight scales the [A, H] input rows rather than the [A, D] output rows, one
    expert at a time while its rows are in cache.
    """

    @staticmethod
    def forward(ctx, h_AH, weight_A, w_EHD, rows):  # type: ignore[override]
        weight_A1 = weight_A[:, None]
        y_TD = h_AH.new_zeros(rows.num_tokens, w_EHD.shape[-1])
        for (e, a, b), token_N in zip(rows.slices, rows.tokens):
            y_TD.index_add_(0, token_N, (h_AH[a:b] * weight_A1[a:b]) @ w_EHD[e])
        ctx.save_for_backward(h_AH, weight_A, w_EHD)
        ctx.rows = rows
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):  # type: ignore[override]
        h_AH, weight_A, w_EHD = ctx.saved_tensors
        rows: ExpertRows = ctx.rows
        need_h, need_weight, need_w = ctx.needs_input_grad[:3]
        grad_y_TD = grad_y_TD.contiguous()
        weight_A1 = weight_A[:, None]
        # every row belongs to a non-empty expert, so the loop writes all of these
        grad_h_AH = torch.empty_like(h_AH) if need_h else None
        grad_weight_A = torch.empty_like(weight_A) if need_weight else None
        grad_w_EHD = rows.weight_grad(w_EHD) if need_w else None
        for (e, a, b), token_N in zip(rows.slices, rows.tokens):
            grad_y_ND = grad_y_TD.index_select(0, token_N)
            if need_w:
                torch.mm((h_AH[a:b] * weight_A1[a:b]).T, grad_y_ND, out=grad_w_EHD[e])
            grad_hw_NH = grad_y_ND @ w_EHD[e].T
            if need_weight:
                torch.sum(grad_hw_NH * h_AH[a:b], 1, out=grad_weight_A[a:b])
            if need_h:
                torch.mul(grad_hw_NH, weight_A1[a:b], out=grad_h_AH[a:b])
        return grad_h_AH, grad_weight_A, grad_w_EHD, None
