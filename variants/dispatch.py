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
step at 24 us each, swiglu) and in gathers, scatters and activations on a few hundred rows;
the earlier padded path (experts in id order, 2-3 per group, all padded to the largest load of
all 64) did 29% pad work (gelu: 21184 rows for 16384 assignments). Sorted by load, the same
routing needs 16560 rows (1% pad) in 19 chunks of 3-4 experts.

Other choices, each measured on the same box:
- No [A, D] copies: a chunk gathers its N rows of x right before its GEMM and again in
  backward; only the [R, P*H] first projection is saved, as a dense FFN saves its hidden
  activations; the activation and its weighted copy are recomputed in backward. Activations
  run per block of consecutive chunks (`blocks`), so 64 small experts are not 64 small ops.
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
# (issue 18): one more chunk costs about CHUNK_SECONDS in its ~50 op calls (gathers, GEMMs,
# activations, weight slices, scatters; at the quick size 64 one-expert chunks took 67.5 ms a
# step against 39.7 ms for 9 chunks, about 0.5 ms per chunk on a busy box), and a pad row costs
# the GEMM FLOPs of a real row (3 GEMMs per projection in fwd+bwd) at FLOP_SECONDS each (`bmm`
# at these shapes ran at 70-90 GFLOP/s).
CHUNK_SECONDS = 400e-6
FLOP_SECONDS = 1 / 70e9
# [N, D] bytes of one chunk's gathered rows (D=128: up to 896 rows; D=512: 224, so every expert
# of the T=4096 sizes is a chunk of its own). Its temporaries live next to the saved
# activations: 448 KiB is the largest multiple of 64 KiB at which the step's peak memory stayed
# at or below the code before this layout at every benchmark size (quick sweep, E=63, H=64,
# gelu: 15.3 MiB both; 512 KiB: 15.6); at 1 MiB the quick step ran 5-6% faster with 13% more.
CHUNK_BYTES = 7 << 16
# swiglu's w1 and w3 are concatenated per chunk up to this hidden width: at H=32 one bmm 64
# wide ran 15-25% faster than two 32 wide; at H=128 the gain no longer paid for the copies
FUSE_MAX_HIDDEN = 64
# Activations run per block of consecutive chunks (`blocks`): [M, H] bytes of one block's
# activation tensors, at most BLOCK_BYTES and 1/BLOCK_FRACTION of the saved first projection
# (so a block's ~6 [M, H] temporaries stay small next to what the layer saves anyway). At T=4096,
# D=512, H=128 (64 one-expert chunks) 1 MiB blocks ran the step 3-4% faster than per-chunk
# activations (+5 MiB peak, still below the code before this layout); at the quick size the
# fraction keeps blocks to single chunks (1 MiB blocks there added 5 MiB to a 15 MiB peak).
BLOCK_BYTES = 1 << 20
BLOCK_FRACTION = 16


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


def _split(parts: list[torch.Tensor], H: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h1, h3) rows of the first projection: h3 is None for gelu; a fused [N, 2H] is split
    into column views, an unfused pair is returned as it is."""
    if len(parts) == 2:
        return parts[0], parts[1]
    h = parts[0]
    return (h[:, :H], h[:, H:]) if h.shape[1] == 2 * H else (h, None)


def _act_forward(activation: str, h1_NH: torch.Tensor, h3_NH: torch.Tensor | None):
    """(act [N, H], silu(h1) for swiglu else None)."""
    if activation == "gelu":
        return torch.nn.functional.gelu(h1_NH), None
    s = torch.nn.functional.silu(h1_NH)
    return s * h3_NH, s


def _act_backward(
    activation: str, grad_act_NH: torch.Tensor, parts: list[torch.Tensor], silu_NH, H: int
) -> list[torch.Tensor]:
    """Gradients of the first projection's rows, laid out like `parts` (aten's backward
    kernels; a fused [N, 2H] gradient has its halves written in place)."""
    h1, h3 = _split(parts, H)
    if activation == "gelu":
        return [torch.ops.aten.gelu_backward(grad_act_NH, h1)]
    grads = [p.new_empty(p.shape) for p in parts]
    g1, g3 = _split(grads, H)
    torch.mul(grad_act_NH, silu_NH, out=g3)  # d/dh3 = silu(h1)
    torch.ops.aten.silu_backward.grad_input(grad_act_NH.mul_(h3), h1, grad_input=g1)
    return grads


def _first_weights(rows: ExpertRows, i: int, w_in: tuple[torch.Tensor, ...]):
    """Chunk i's first-projection weights, aligned with the hidden parts: [w1|w3] when fused,
    else one per weight."""
    parts = [rows.weights(i, w) for w in w_in]
    return [torch.cat(parts, dim=-1)] if len(parts) > 1 and rows.fused else parts


def _hidden(h_store: torch.Tensor, a: int, b: int) -> list[torch.Tensor]:
    """Rows a..b of the saved first projection: [h] ([R, P*H] store) or [h1, h3] ([2, R, H])."""
    return [h_store[a:b]] if h_store.dim() == 2 else [h_store[0, a:b], h_store[1, a:b]]


def blocks(chunks: tuple[Chunk, ...], row_bytes: int) -> list[tuple[int, int]]:
    """Runs of consecutive chunks (first, end) whose [rows, H] activations (`row_bytes` a row)
    fit the block budget, at least one chunk each: the activation, its gradient and the combine
    weight's gradient run once per block instead of once per chunk."""
    rows = chunks[-1].stop if chunks else 0
    budget = min(BLOCK_BYTES, rows * row_bytes // BLOCK_FRACTION)
    out: list[tuple[int, int]] = []
    for i, chunk in enumerate(chunks):
        if out and (chunk.stop - chunks[out[-1][0]].start) * row_bytes <= budget:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class ExpertFFN(torch.autograd.Function):
    """The routed FFN of every chunk in one Function (see the module docstring).

    Only the first projection is saved ([R, P*H], or w1's and w3's rows as two contiguous
    [R, H] when not fused). GEMMs, gathers and scatters run per chunk; activations and their
    gradients per block of chunks (`blocks`). Backward keeps at most one [N, D] temporary at a
    time. Activations: "gelu" (exact erf), "swiglu".
    """

    @staticmethod
    def forward(ctx, x_TD, weight_R, rows, activation, w1_EDH, w2_EHD, w3_EDH):  # type: ignore[override]
        H, R = w1_EDH.shape[-1], rows.token_R.numel()
        w_in = (w1_EDH,) if w3_EDH is None else (w1_EDH, w3_EDH)
        if len(w_in) == 2 and not rows.fused:
            h_store = x_TD.new_empty(2, R, H)
        else:
            h_store = x_TD.new_empty(R, len(w_in) * H)
        weight_R1 = weight_R[:, None]
        y_TD = x_TD.new_zeros(rows.num_tokens, w2_EHD.shape[-1])
        for first, end in blocks(rows.chunks, H * x_TD.element_size()):
            A, B = rows.chunks[first].start, rows.chunks[end - 1].stop
            for i in range(first, end):
                chunk, token_N = rows.chunks[i], rows.tokens[i]
                x_ND = x_TD.index_select(0, token_N)
                parts = _hidden(h_store, chunk.start, chunk.stop)
                for w, h in zip(_first_weights(rows, i, w_in), parts):
                    _bmm(x_ND, w, h)
                del x_ND
            parts = _hidden(h_store, A, B)
            aw_MH = _act_forward(activation, *_split(parts, H))[0].mul_(weight_R1[A:B])
            for i in range(first, end):
                a, b = rows.chunks[i].start - A, rows.chunks[i].stop - A
                out_ND = _bmm(aw_MH[a:b], rows.weights(i, w2_EHD))
                y_TD.index_add_(0, rows.tokens[i], out_ND)
        ctx.save_for_backward(x_TD, weight_R, w1_EDH, w2_EHD, w3_EDH, h_store)
        ctx.rows, ctx.activation = rows, activation
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):  # type: ignore[override]
        x_TD, weight_R, w1_EDH, w2_EHD, w3_EDH, h_store = ctx.saved_tensors
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
        for first, end in blocks(rows.chunks, H * x_TD.element_size()):
            A, B = rows.chunks[first].start, rows.chunks[end - 1].stop
            parts = _hidden(h_store, A, B)
            act_MH, silu_MH = _act_forward(ctx.activation, *_split(parts, H))
            aw_MH = act_MH * weight_R1[A:B] if need_w2 else None
            grad_aw_MH = act_MH.new_empty(act_MH.shape)
            for i in range(first, end):
                a, b = rows.chunks[i].start - A, rows.chunks[i].stop - A
                grad_y_ND = grad_y_TD.index_select(0, rows.tokens[i])
                if need_w2:
                    _weight_grad(rows, i, grad_w2, aw_MH[a:b], grad_y_ND)
                _bmm(grad_y_ND, rows.weights(i, w2_EHD).transpose(1, 2), grad_aw_MH[a:b])
            del grad_y_ND, aw_MH  # at most one [N, D] temporary at a time from here
            if need_weight:
                torch.linalg.vecdot(grad_aw_MH, act_MH, out=grad_weight_R[A:B])
            del act_MH
            grad_act_MH = grad_aw_MH.mul_(weight_R1[A:B])
            grad_parts = _act_backward(ctx.activation, grad_act_MH, parts, silu_MH, H)
            del grad_aw_MH, grad_act_MH, silu_MH
            for i in range(first, end):
                chunk, token_N = rows.chunks[i], rows.tokens[i]
                a, b, G = chunk.start - A, chunk.stop - A, len(chunk.experts)
                grads_N = [g[a:b] for g in grad_parts]
                if any(g is not None for g in grads_in):
                    x_ND = x_TD.index_select(0, token_N)
                    if len(grads_in) == 2 and rows.fused:
                        grad_GDPH = _bmm_tn(x_ND, grads_N[0], G)
                        for p, grad in enumerate(grads_in):
                            if grad is not None:
                                rows.put_grad(i, grad, grad_GDPH[..., p * H : (p + 1) * H])
                    else:
                        for grad, g_NH in zip(grads_in, grads_N):
                            if grad is not None:
                                _weight_grad(rows, i, grad, x_ND, g_NH)
                    del x_ND
                if need_x:
                    w_first = _first_weights(rows, i, w_in)
                    grad_x_ND = _bmm(grads_N[0], w_first[0].transpose(1, 2))
                    for g_NH, w in zip(grads_N[1:], w_first[1:]):
                        _baddbmm_(grad_x_ND, g_NH, w.transpose(1, 2))
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
