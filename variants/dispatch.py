"""Dropless grouped dispatch on CPU: the routed expert FFN as one autograd Function over chunks.

Shape legend: T tokens, D model width, H expert hidden width, P weights of the first projection
(1: w1 for gelu; 2: w1 and w3 side by side for swiglu), E experts, A kept assignments, R rows of
the layout, G experts of one chunk, C rows per expert of a chunk, N = G*C rows of one chunk.

    y[t] = sum over rows r with token[r] = t of
           weight[r] * act(x[t] @ w1[e(r)], x[t] @ w3[e(r)]) @ w2[e(r)]

The layout (`ExpertRows`, planned by `plan_chunks` from the per-expert loads):
- Experts sorted by load, largest first, cut into chunks. In a chunk every expert owns C rows,
  C = the chunk's largest load, so each projection of a chunk is one `torch.bmm` over [G, C, *]
  (`torch.mm` when G = 1). Pad rows point at token 0 with combine weight 0: they add exact zeros
  to the output and to every gradient.
- A chunk takes the next expert while its [N, D] temporaries stay within `CHUNK_BYTES` and the
  GEMM work on the pad rows that expert adds costs less than one more chunk's ops (measured
  constants below). Sorted neighbours have similar loads, so little is padded; a chunk of one
  expert has no padding at all ("per_expert", which `path` can force).
Why this shape, from torch.profiler on 2 AMD EPYC threads (issue 18, T=2048, D=128, E=64, K=8,
H=32, fwd+bwd): one `mm` per expert spent most of the step in per-op dispatch (524 `mm` calls a
step at 24 us each) and in gathers, scatters and activations too small to use both threads;
chunks of 2-3 experts padded to the largest load of all 64 did 29% pad work and still ran
~20 small chunks. Chunks sized by bytes run every elementwise op on both threads, and the
sorted loads keep the padding to a few percent.

Other choices, each measured on the same box:
- No [A, D] copies: a chunk gathers its N rows of x right before its GEMM and again in
  backward; only the [R, P*H] first projection is saved, as a dense FFN saves its hidden
  activations; the activation and its weighted copy are recomputed per chunk in backward.
- swiglu's w1 and w3 of a chunk are concatenated ([G, D, 2H]) so the first projection, its
  input gradient and its weight gradient are one GEMM each, 2H wide instead of two H wide:
  at H=32 a bmm 64 wide ran 15-25% faster than two 32 wide.
- The combine weight scales the [N, H] input of the second projection instead of its [N, D]
  output (`(w * a) @ W2 == w * (a @ W2)`), and its gradient is one rowwise dot.
- On CPU `grouped_mm` loops over experts internally; `mm`/`bmm` on row slices write in place.
The GEMMs and sums are those of the `loop` reference, up to floating-point summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PER_EXPERT, PADDED_BMM = "per_expert", "padded_bmm"
PATHS = (PER_EXPERT, PADDED_BMM)

# The chunking rule's constants, measured on 2 AMD EPYC threads, fp32, forward+backward
# (issue 18): one more chunk costs about CHUNK_SECONDS of op dispatch (its ~20 gathers, GEMM
# calls, activations and scatters), and a pad row costs the GEMM FLOPs of a real row
# (3 GEMMs per projection in fwd+bwd) at about FLOP_SECONDS each.
CHUNK_SECONDS = 400e-6
FLOP_SECONDS = 1 / 70e9
# [N, D] bytes of one chunk's gathered rows: its temporaries live next to the saved activations,
# so this bounds the memory the chunking adds (quick size: 2048 rows; T=4096, D=512: 512).
CHUNK_BYTES = 1 << 19
# swiglu's w1 and w3 are concatenated per chunk up to this hidden width: at H=32 one bmm 64
# wide ran 15-25% faster than two 32 wide; at H=128 the gain no longer paid for the copies
FUSE_MAX_HIDDEN = 64


@dataclass(frozen=True)
class Chunk:
    """G experts (`experts`, in row order) of C rows each, rows `start` .. `stop` - 1."""

    experts: tuple[int, ...]
    capacity: int
    start: int

    @property
    def stop(self) -> int:
        return self.start + len(self.experts) * self.capacity

    @property
    def span(self) -> tuple[int, int] | None:
        """(first, end) when the experts are consecutive and ascending: weights are a view."""
        e0, e1 = self.experts[0], self.experts[0] + len(self.experts)
        return (e0, e1) if self.experts == tuple(range(e0, e1)) else None


def plan_chunks(
    counts: list[int], row_bytes: int, row_flops: int, path: str | None = None
) -> list[Chunk]:
    """Chunks of the non-empty experts, largest load first (see the module docstring).

    `row_bytes`: bytes of one gathered [D] row; `row_flops`: forward+backward GEMM FLOPs of one
    row. `path` "per_expert" gives one expert per chunk; "padded_bmm" fills chunks up to
    `CHUNK_BYTES` whatever the padding; None chooses by the cost rule.
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {PATHS}")
    order = sorted((e for e, n in enumerate(counts) if n), key=lambda e: -counts[e])
    groups: list[list[int]] = []
    for e in order:
        if groups and path != PER_EXPERT:
            members = groups[-1]
            C = counts[members[0]]
            fits = (len(members) + 1) * C * row_bytes <= CHUNK_BYTES
            pad_seconds = (C - counts[e]) * row_flops * FLOP_SECONDS
            if fits and (path == PADDED_BMM or pad_seconds < CHUNK_SECONDS):
                members.append(e)
                continue
        groups.append([e])
    chunks, start = [], 0
    for members in groups:
        # ascending ids within a chunk: equal loads keep consecutive experts (a weight view)
        chunk = Chunk(tuple(sorted(members)), counts[members[0]], start)
        chunks.append(chunk)
        start = chunk.stop
    return chunks


@dataclass(frozen=True)
class ExpertRows:
    """The dispatch layout: its chunks, the token of each row and each chunk's tokens."""

    token_R: torch.Tensor  # [R] long; pad rows: token 0
    chunks: tuple[Chunk, ...]
    tokens: tuple[torch.Tensor, ...]  # token_R[start:stop] of each chunk
    indices: tuple[torch.Tensor | None, ...]  # expert ids of a chunk whose weights are gathered
    num_tokens: int
    fused: bool = False  # swiglu's w1 and w3 concatenated per chunk (one GEMM 2H wide)

    @property
    def path(self) -> str:
        """ "padded_bmm" when a chunk holds several experts, else "per_expert"."""
        return PADDED_BMM if any(len(c.experts) > 1 for c in self.chunks) else PER_EXPERT

    @classmethod
    def build(
        cls,
        expert_A: torch.Tensor,
        token_A: torch.Tensor,
        weight_A: torch.Tensor,
        chunks: list[Chunk],
        num_experts: int,
        num_tokens: int,
        fused: bool = False,
    ) -> tuple[ExpertRows, torch.Tensor]:
        """(rows, weight_R) from assignments sorted by expert (stable) and their chunks."""
        device = token_A.device
        R = chunks[-1].stop if chunks else 0
        start_E = [0] * num_experts  # first sorted assignment of each expert
        base_E = [0] * num_experts  # first row of each expert in the layout
        for chunk in chunks:
            for j, e in enumerate(chunk.experts):
                base_E[e] = chunk.start + j * chunk.capacity
        load_E = torch.bincount(expert_A, minlength=num_experts)
        start_E = torch.cumsum(load_E, 0) - load_E
        shift_E = torch.tensor(base_E, device=device) - start_E
        slot_A = torch.arange(expert_A.numel(), device=device) + shift_E[expert_A]
        token_R = token_A.new_zeros(R).index_put_((slot_A,), token_A)
        weight_R = weight_A.new_zeros(R).index_put((slot_A,), weight_A)
        indices = tuple(None if c.span else torch.tensor(c.experts, device=device) for c in chunks)
        tokens = tuple(token_R[c.start : c.stop] for c in chunks)
        return cls(token_R, tuple(chunks), tokens, indices, num_tokens, fused), weight_R

    def weights(self, i: int, w_EXY: torch.Tensor) -> torch.Tensor:
        """Chunk i's experts of a weight, [G, X, Y]: a view when they are consecutive."""
        span, index = self.chunks[i].span, self.indices[i]
        return w_EXY[span[0] : span[1]] if span else w_EXY.index_select(0, index)

    def grad_slot(self, i: int, grad_EXY: torch.Tensor) -> torch.Tensor | None:
        """The [G, X, Y] slice of a full gradient chunk i can write in place, if any."""
        span = self.chunks[i].span
        return grad_EXY[span[0] : span[1]] if span else None

    def put_grad(self, i: int, grad_EXY: torch.Tensor, value_GXY: torch.Tensor) -> None:
        """Write chunk i's weight gradient into the full [E, X, Y] gradient."""
        span, index = self.chunks[i].span, self.indices[i]
        if span:
            grad_EXY[span[0] : span[1]].copy_(value_GXY)
        else:
            grad_EXY.index_copy_(0, index, value_GXY)

    def grad_buffer(self, w_EXY: torch.Tensor) -> torch.Tensor:
        """A weight-gradient buffer: the chunks write their experts; the rest are zero."""
        grad_EXY = torch.empty_like(w_EXY)
        busy = {e for c in self.chunks for e in c.experts}
        for e in range(w_EXY.shape[0]):
            if e not in busy:
                grad_EXY[e].zero_()
        return grad_EXY


def sort_by_expert(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The stable order of assignments by expert (`argsort(expert_A, stable=True)`).

    torch's CPU sort of an integer tensor switches to a radix sort at 2**15 elements: on the
    2-core dev box a stable argsort of 16384 uint8 keys took 0.71 ms and of 32768 keys 0.10 ms
    (torch 2.13). So short key lists are padded with a key larger than every expert's up to
    that size; being largest, the pad sorts last and the first A positions are the answer.
    """
    A = expert_A.numel()
    if expert_A.is_cuda or num_experts > 255:
        return torch.argsort(expert_A, stable=True)
    keys = expert_A.to(torch.uint8)
    if 0 < A < RADIX_SORT_MIN:
        keys = torch.cat([keys, keys.new_full((RADIX_SORT_MIN - A,), num_experts)])
    return torch.argsort(keys, stable=True)[:A]


RADIX_SORT_MIN = 1 << 15


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


def _bmm_tn(
    a_NX: torch.Tensor, b_NY: torch.Tensor, G: int, out_GXY: torch.Tensor | None = None
) -> torch.Tensor:
    """Per expert a^T b over its rows: [G, X, Y] (into `out_GXY` when given)."""
    if G == 1:
        if out_GXY is None:
            return torch.mm(a_NX.T, b_NY)[None]
        torch.mm(a_NX.T, b_NY, out=out_GXY[0])
        return out_GXY
    a_GCX, b_GCY = a_NX.view(G, -1, a_NX.shape[-1]), b_NY.view(G, -1, b_NY.shape[-1])
    return torch.bmm(a_GCX.transpose(1, 2), b_GCY, out=out_GXY)


def _baddbmm_(out_NY: torch.Tensor, a_NX: torch.Tensor, w_GXY: torch.Tensor) -> None:
    """`out += a @ w` per expert, in place."""
    G = w_GXY.shape[0]
    if G == 1:
        out_NY.addmm_(a_NX, w_GXY[0])
        return
    out_NY.view(G, -1, out_NY.shape[-1]).baddbmm_(a_NX.view(G, -1, a_NX.shape[-1]), w_GXY)


def _act_forward(activation: str, h_NPH: torch.Tensor, H: int):
    """(act [N, H], silu(h1) for swiglu else None) from the first projection's rows."""
    if activation == "gelu":
        return torch.nn.functional.gelu(h_NPH), None
    s = torch.nn.functional.silu(h_NPH[:, :H])
    return s * h_NPH[:, H:], s


def _act_backward(activation, grad_act_NH, h_NPH, silu_NH, H: int) -> torch.Tensor:
    """Gradient of the first projection's rows [N, P*H] (aten's backward kernels)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_act_NH, h_NPH)
    grad_NPH = h_NPH.new_empty(h_NPH.shape)
    torch.mul(grad_act_NH, silu_NH, out=grad_NPH[:, H:])  # d/dh3 = silu(h1)
    torch.ops.aten.silu_backward.grad_input(
        grad_act_NH.mul_(h_NPH[:, H:]), h_NPH[:, :H], grad_input=grad_NPH[:, :H]
    )
    return grad_NPH


def _first_weights(rows: ExpertRows, i: int, w_in: tuple[torch.Tensor, ...]):
    """Chunk i's first-projection weights: one [G, D, P*H] tensor when fused, else P views."""
    parts = [rows.weights(i, w) for w in w_in]
    return [torch.cat(parts, dim=-1)] if len(parts) > 1 and rows.fused else parts


class ExpertFFN(torch.autograd.Function):
    """The routed FFN of every chunk in one Function (see the module docstring).

    Only the [R, P*H] first projection is saved; every other [N, *] temporary lives for one
    chunk, and backward keeps at most one [N, D] temporary at a time. Activations: "gelu"
    (exact erf) and "swiglu".
    """

    @staticmethod
    def forward(ctx, x_TD, weight_R, rows, activation, w1_EDH, w2_EHD, w3_EDH):  # type: ignore[override]
        H = w1_EDH.shape[-1]
        w_in = (w1_EDH,) if w3_EDH is None else (w1_EDH, w3_EDH)
        h_RPH = x_TD.new_empty(rows.token_R.numel(), len(w_in) * H)
        weight_R1 = weight_R[:, None]
        y_TD = x_TD.new_zeros(rows.num_tokens, w2_EHD.shape[-1])
        for i, (chunk, token_N) in enumerate(zip(rows.chunks, rows.tokens)):
            a, b = chunk.start, chunk.stop
            x_ND = x_TD.index_select(0, token_N)
            w_first = _first_weights(rows, i, w_in)
            width = h_RPH.shape[1] // len(w_first)
            for p, w in enumerate(w_first):
                _bmm(x_ND, w, h_RPH[a:b, p * width : (p + 1) * width])
            del x_ND
            act_NH = _act_forward(activation, h_RPH[a:b], H)[0].mul_(weight_R1[a:b])
            y_TD.index_add_(0, token_N, _bmm(act_NH, rows.weights(i, w2_EHD)))
        ctx.save_for_backward(x_TD, weight_R, w1_EDH, w2_EHD, w3_EDH, h_RPH)
        ctx.rows, ctx.activation = rows, activation
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):  # type: ignore[override]
        x_TD, weight_R, w1_EDH, w2_EHD, w3_EDH, h_RPH = ctx.saved_tensors
        rows: ExpertRows = ctx.rows
        need_x, need_weight, _, _, need_w1, need_w2, need_w3 = ctx.needs_input_grad
        H = w1_EDH.shape[-1]
        w_in = (w1_EDH,) if w3_EDH is None else (w1_EDH, w3_EDH)
        grad_y_TD = grad_y_TD.contiguous()
        weight_R1 = weight_R[:, None]
        grad_x_TD = torch.zeros_like(x_TD) if need_x else None
        grad_weight_R = torch.empty_like(weight_R) if need_weight else None
        needs_in = (need_w1, need_w3)
        grads_in = [rows.grad_buffer(w) if need else None for w, need in zip(w_in, needs_in)]
        grad_w2 = rows.grad_buffer(w2_EHD) if need_w2 else None
        for i, (chunk, token_N) in enumerate(zip(rows.chunks, rows.tokens)):
            a, b, G = chunk.start, chunk.stop, len(chunk.experts)
            h_NPH = h_RPH[a:b]
            act_NH, silu_NH = _act_forward(ctx.activation, h_NPH, H)
            grad_y_ND = grad_y_TD.index_select(0, token_N)
            w2_GHD = rows.weights(i, w2_EHD)
            if need_w2:
                _weight_grad(rows, i, grad_w2, act_NH * weight_R1[a:b], grad_y_ND)
            grad_aw_NH = _bmm(grad_y_ND, w2_GHD.transpose(1, 2))
            del grad_y_ND  # at most one [N, D] temporary at a time from here
            if need_weight:
                torch.linalg.vecdot(grad_aw_NH, act_NH, out=grad_weight_R[a:b])
            del act_NH
            grad_h_NPH = _act_backward(
                ctx.activation, grad_aw_NH.mul_(weight_R1[a:b]), h_NPH, silu_NH, H
            )
            del grad_aw_NH, silu_NH
            if any(g is not None for g in grads_in):
                x_ND = x_TD.index_select(0, token_N)
                if len(grads_in) > 1 and rows.fused:
                    grad_GDPH = _bmm_tn(x_ND, grad_h_NPH, G)
                    for p, grad in enumerate(grads_in):
                        if grad is not None:
                            rows.put_grad(i, grad, grad_GDPH[..., p * H : (p + 1) * H])
                else:
                    for p, grad in enumerate(grads_in):
                        if grad is not None:
                            _weight_grad(rows, i, grad, x_ND, grad_h_NPH[:, p * H : (p + 1) * H])
                del x_ND
            if need_x:
                w_first = _first_weights(rows, i, w_in)
                width = grad_h_NPH.shape[1] // len(w_first)
                grad_x_ND = _bmm(grad_h_NPH[:, :width], w_first[0].transpose(1, 2))
                for p in range(1, len(w_first)):
                    g_NH = grad_h_NPH[:, p * width : (p + 1) * width]
                    _baddbmm_(grad_x_ND, g_NH, w_first[p].transpose(1, 2))
                grad_x_TD.index_add_(0, token_N, grad_x_ND)
        grad_w1, grad_w3 = grads_in if len(grads_in) == 2 else (grads_in[0], None)
        return grad_x_TD, grad_weight_R, None, None, grad_w1, grad_w2, grad_w3


def _weight_grad(
    rows: ExpertRows, i: int, grad_EXY: torch.Tensor, a_NX: torch.Tensor, b_NY: torch.Tensor
) -> None:
    """Chunk i's per-expert a^T b into the full gradient: in place when it is a slice of it."""
    slot = rows.grad_slot(i, grad_EXY)
    value = _bmm_tn(a_NX, b_NY, len(rows.chunks[i].experts), slot)
    if slot is None:
        rows.put_grad(i, grad_EXY, value)
