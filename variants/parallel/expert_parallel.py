"""Expert parallelism (EP): a token-choice MoELayer's experts sharded over a process group.

    ep = ExpertParallel(variants.build("mixtral", num_experts=8, ...), group)  # on every rank
    out = ep(x_local)        # MoEOutput of this rank's tokens, same contract as the layer
    ep.stats                 # EPStats of the last forward: traffic, balance across ranks, times

Shape legend: T this rank's tokens, D model width, E routed experts, P ranks (world size of the
group), L = E/P experts per rank, A this rank's kept assignments, U (token, destination rank)
rows this rank sends, R rows it receives, B assignments it receives.

Design (the path of one forward, every step on every rank):
1. Route: the layer's own router (replicated, same weights on every rank) routes this rank's T
   tokens. Nothing else routes: the `Routing` record is the one the single-process layer makes
   from the same tokens.
2. Counts: one `all_gather` of each rank's counts (rows per destination rank, kept assignments
   per expert, T, max ranks per token). Every rank then knows the whole [P, P] traffic matrix,
   so the split sizes of every all-to-all below are known, and EPStats is global.
3. Dispatch: expert e lives on rank e // L (contiguous groups, so a DeepSeek-V2 "device" or a
   V3 "group" is a rank or a set of ranks). A token is sent ONCE to each rank that holds one of
   its kept experts (a U row per (token, rank) pair, as DeepSeek-V2's device-limited routing
   assumes: its bound of M devices per token is a bound on these rows, arXiv:2405.04434
   Sec. 2.2.2), with the combine weights of its assignments on that rank packed into the same
   buffer: one differentiable `all_to_all_single` with uneven splits. A second, integer
   all-to-all carries each received assignment's row (not differentiable: indices).
4. Expert compute: the local backend (`grouped` or `loop`) runs the L local experts on the R
   received rows with a local Routing record (row, local expert, weight), so each rank sums the
   weighted outputs of its experts per received row.
5. Combine: the [R, D] partial sums go back along the reverse splits (differentiable
   `all_to_all_single`) and are added into their tokens; shared experts run locally on all T.

Autograd goes through `torch.distributed.nn.functional.all_to_all_single` (torch's own
differentiable collective: its backward is the reverse all-to-all), so gradients reach the
input, the router (through the shipped combine weights) and the local experts. Each forward has
exactly one differentiable collective per direction, tied into the graph on every rank even
when a rank receives nothing, so every rank runs the same backward collectives in the same
order. Every rank must backpropagate through its output (as in any EP training step).

Replicated parameters: the router and the shared experts live on every rank; their gradients
come from that rank's tokens only. Call `sync_replicated_grads()` (all-reduce over the group)
before the optimizer step, as data parallelism does for dense weights.

Capacity is per rank, as in real EP: each rank's router sees only its own T tokens, so a
per-expert capacity `ceil(capacity_factor * T * K / E)` (Switch arXiv:2101.03961 Sec. 2.2,
GShard arXiv:2006.16668 Sec. 2.2: capacity per group of local tokens) and DeepSeek-V2's
per-device budget `ceil(capacity_factor * K * T / V)` (Sec. 2.2.4) are computed from local
T and enforced by each sender. A receiving expert therefore gets at most P times one sender's
capacity; the totals equal the single-process layer's on P*T tokens, but which assignments are
dropped depends on how tokens are split over ranks. With capacity_factor=None EP equals the
single-process layer exactly (tests/variants/test_expert_parallel.py).

Balance losses are the router's own, computed over this rank's tokens (each rank's loss is
averaged over ranks by the data-parallel gradient all-reduce). Per variant:
- switch, gshard: local, as the papers do (the loss is computed per group of local tokens:
  GShard Algorithm 1 "per group"; Switch Sec. 2.2 per core batch in Mesh TensorFlow).
- deepseek_v2, deepseek_v3: per sequence (V2 Eq. 12-20, V3 Eq. 17-20); a sequence lives on one
  rank, so local is exactly the paper's value. V3's loss-free bias is the global case: the
  bias update uses the load of the whole batch, so `ExpertParallel.update_bias()` all-reduces
  `router.load_count` over the group before updating (arXiv:2408.15664 Algorithm 1); every
  step count of a router (its integer buffers, `sync_step_counts`: ReMoE's sparsity counts too)
  is summed the same way.
- deepseek_moe, mixtral: per micro-batch on each rank (DeepSeekMoE's device-level loss exists
  for EP and is computed from each device's batch; Megatron's Mixtral loss is per micro-batch).
- noisy_topk: departure. Shazeer et al. (arXiv:1701.06538 Sec. 3.1) apply the losses to the
  combined batch of all devices; here they are local (the router does not expose its
  per-expert sums to all-reduce them). Dropless routing is unaffected.
Expert choice is refused: its experts choose among all tokens, which is not per-rank routing.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from ..compute.assignments import Routing
from ..compute.backends import BACKENDS
from ..contract.config import check_int
from ..contract.layer import MoELayer, MoEOutput, assemble, expert_compute, flatten_tokens
from ..contract.routing import reset_balance_counts, sync_step_counts

# the local expert backends expert parallelism runs on: those whose BackendSpec says so
LOCAL_BACKENDS = tuple(name for name, spec in BACKENDS.items() if spec.expert_parallel)
INDEX_BYTES = 8  # each dispatched assignment also ships its row index as int64


# ---------------------------------------------------------------------------------------------
# Plan and statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EPPlan:
    """Which experts this rank holds: the contiguous block `first .. first + per_rank - 1`."""

    num_experts: int
    world_size: int
    rank: int
    backend: str

    def __post_init__(self) -> None:
        check_int(self, "num_experts", 1)
        check_int(self, "world_size", 1)
        check_int(self, "rank", 0)
        if self.num_experts % self.world_size:
            raise ValueError(
                f"num_experts={self.num_experts} must be divisible by world_size="
                f"{self.world_size} (each rank holds num_experts/world_size experts)"
            )
        if self.rank >= self.world_size:
            raise ValueError(f"rank={self.rank} must be < world_size={self.world_size}")
        if self.backend not in LOCAL_BACKENDS:
            raise ValueError(
                f"backend={self.backend!r} is not one of {', '.join(map(repr, LOCAL_BACKENDS))} "
                "(the local expert backends expert parallelism runs on)"
            )

    @property
    def per_rank(self) -> int:
        return self.num_experts // self.world_size

    @property
    def first(self) -> int:
        return self.rank * self.per_rank


@dataclass
class EPStats:
    """The exchange of one forward, the same on every rank except the times (this rank's).

    Volumes are exact; bytes count only what leaves a rank (rows a rank keeps are not sent).
    """

    world_size: int
    rank_tokens: torch.Tensor  # [P, P] long: token rows sent from rank src (row) to dst (col)
    rank_assignments: torch.Tensor  # [P, P] long: kept assignments from src to dst
    num_tokens: int  # tokens over all ranks
    dispatch_bytes: int  # off-rank bytes of the dispatch: rows, weights and row indices
    combine_bytes: int  # off-rank bytes of the combine: rows
    remote_fraction: float  # kept assignments whose expert lives on another rank / all kept
    devices_per_token: float  # mean over tokens of the ranks its kept assignments go to
    devices_per_token_max: int  # the most ranks one token goes to
    rank_imbalance: float  # max / mean of token rows received per rank (1 = balanced)
    route_ms: float = 0.0  # this rank: router
    dispatch_ms: float = 0.0  # count exchange, index and row all-to-alls
    expert_ms: float = 0.0  # local experts
    combine_ms: float = 0.0  # row all-to-all back, weighted sum into tokens

    @property
    def bytes_per_token(self) -> float:
        return (self.dispatch_bytes + self.combine_bytes) / max(self.num_tokens, 1)

    @property
    def a2a_ms(self) -> float:
        """Time in the exchanges (dispatch + combine)."""
        return self.dispatch_ms + self.combine_ms

    @property
    def received_tokens(self) -> torch.Tensor:
        """[P] token rows received per rank."""
        return self.rank_tokens.sum(0)

    def metrics(self) -> dict[str, float]:
        """Scalar metrics under their result-schema names (`moe_bench.schema`, the
        expert_parallel task's metrics; `rank_tokens` is the matrix)."""
        return {
            "devices_per_token": self.devices_per_token,
            "devices_per_token_max": float(self.devices_per_token_max),
            "bytes_per_token": self.bytes_per_token,
            "remote_fraction": self.remote_fraction,
            "rank_imbalance": self.rank_imbalance,
            "a2a_ms": self.a2a_ms,
            "route_ms": self.route_ms,
            "dispatch_ms": self.dispatch_ms,
            "expert_ms": self.expert_ms,
            "combine_ms": self.combine_ms,
        }


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _all_to_all(
    out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group
) -> torch.Tensor:
    """torch's differentiable all_to_all_single (its backward is the reverse exchange).

    torch marks the torch.distributed.nn functions deprecated in favour of the functional
    collectives (compile-oriented, private autograd); the eager one is the documented
    differentiable collective, so its FutureWarning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_to_all_single(out, inp, out_splits, in_splits, group=group)


def _check_groups(cfg: Any, world_size: int) -> None:
    """Expert groups (V2 devices, V3 node groups, DeepSeekMoE devices) must not straddle ranks:
    one group is a rank or a set of ranks, or one rank holds whole groups."""
    for name in ("num_devices", "num_groups"):
        value = getattr(cfg, name, 1)
        if value > 1 and value % world_size and world_size % value:
            raise ValueError(
                f"{name}={value} must divide or be a multiple of world_size={world_size}, so "
                "each expert group lives on whole ranks"
            )


# ---------------------------------------------------------------------------------------------
# The expert-parallel layer
# ---------------------------------------------------------------------------------------------


def check_shardable(layer: nn.Module) -> None:
    """ValueError naming what stops `layer` from running expert-parallel, else nothing (checked
    by the wrapper, and by the expert_parallel task before any rank starts)."""
    if not isinstance(layer, MoELayer):
        raise ValueError(
            f"layer={type(layer).__name__} must be a routed MoELayer (variants.build of a "
            "token-choice variant): it has no routed experts to shard"
        )
    if type(layer).forward is not MoELayer.forward:
        raise ValueError(
            f"layer={type(layer).__name__} has a forward of its own (more than router -> "
            "experts, e.g. zero-computation experts); expert parallelism shards layers whose "
            "output is the router's routing plus shared experts only"
        )
    if not layer.cfg.token_choice:
        raise ValueError(
            f"layer config {type(layer.cfg).__name__} is not token-choice: its experts "
            "choose among all tokens of the batch, so ranks cannot route their own tokens; "
            "expert parallelism takes token-choice variants only"
        )
    if not layer.router_grad.expert_parallel:
        raise ValueError(
            f"router_grad={layer.cfg.router_grad!r} cannot run expert-parallel: its "
            "estimator needs every expert's outputs on one rank; use router_grad='topk'"
        )


class ExpertParallel(nn.Module):
    """A token-choice MoELayer executed expert-parallel over `group` (default: the world).

    Call on every rank with a layer built identically (same seed or a broadcast state): this
    rank keeps the router, the shared experts and a copy of its L = E/P experts; drop the
    full layer afterwards to free the other experts. `backend` overrides the layer's local
    backend (`grouped` or `loop`). The forward returns this rank's tokens' MoEOutput; its
    `routing` is the router's record (global expert ids). `stats` holds the last EPStats.
    """

    def __init__(
        self,
        layer: nn.Module,
        group: dist.ProcessGroup | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_shardable(layer)
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialized: call torch.distributed."
                "init_process_group on every rank (a launcher starts the ranks) before "
                "ExpertParallel"
            )
        cfg = layer.cfg
        self.group = group
        self.plan = EPPlan(
            num_experts=cfg.num_experts,
            world_size=dist.get_world_size(group),
            rank=dist.get_rank(group),
            backend=backend if backend is not None else cfg.backend,
        )
        _check_groups(cfg, self.plan.world_size)
        self.cfg = cfg
        self.router = layer.router
        self.shared = layer.shared
        self.shared_gate = layer.shared_gate  # Qwen2-MoE / Qwen3-Next's sigmoid gate, or None
        self.experts = layer.experts.slice_experts(
            self.plan.first, self.plan.first + self.plan.per_rank
        )
        self.backend = expert_compute(layer.cfg, self.plan.backend)
        self.stats: EPStats | None = None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        """`token_ids` (x's shape without D): this rank's tokens' ids, passed to the router as
        the layer does (hash routing reads them; other routers ignore them)."""
        dev = x.device
        t0 = _now(dev)
        x_TD, num_seqs = flatten_tokens(x, self.cfg.d_model)
        # the layer's own routing of this rank's tokens
        routing, losses = self.router(x_TD, num_seqs, token_ids)

        t1 = _now(dev)
        out = _outgoing(routing, x_TD.shape[0], self.plan)
        counts = self._exchange_counts(out, routing.load, x_TD.shape[0])
        x_RD, local, recv_flat = self._dispatch(x_TD, out, counts)

        t2 = _now(dev)
        y_RD, path = self.backend(x_RD, local, self.experts)
        # tie the dispatch into the graph even when nothing arrived, so every rank runs the
        # dispatch's backward all-to-all (an untied rank would leave the others waiting)
        y_RD = y_RD + recv_flat[:0].sum()

        t3 = _now(dev)
        recv_rows = counts[:, self.plan.rank].tolist()
        y_UD = _all_to_all(
            y_RD.new_empty(out.token_U.numel(), y_RD.shape[1]),
            y_RD,
            out.rows_to_P.tolist(),
            recv_rows,
            self.group,
        )
        y_TD = x_TD.new_zeros(x_TD.shape).index_add(0, out.token_U, y_UD.to(x_TD.dtype))
        y_TD = self.add_shared(x_TD, y_TD)
        t4 = _now(dev)

        P, L, D = self.plan.world_size, self.plan.per_rank, self.cfg.d_model
        self.stats = _stats(counts, P, L, D, x_TD.element_size(), x_TD.element_size())
        self.stats.route_ms, self.stats.dispatch_ms = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
        self.stats.expert_ms, self.stats.combine_ms = 1e3 * (t3 - t2), 1e3 * (t4 - t3)
        return assemble(x, y_TD, losses, routing, path)

    # the shared experts, sigmoid-gated where the layer is (one rule: the layer's own)
    add_shared = MoELayer.add_shared

    def _exchange_counts(self, out: Outgoing, load_E: torch.Tensor, T: int) -> torch.Tensor:
        """All ranks' counts, [P, P + E + 2] on the CPU: per source rank, its rows per
        destination, its kept assignments per expert, its tokens, its max ranks per token."""
        T_1 = torch.tensor([T], device=load_E.device)
        mine_C = torch.cat([out.rows_to_P, load_E, T_1, out.max_ranks.view(1)])
        gathered = [torch.empty_like(mine_C) for _ in range(self.plan.world_size)]
        dist.all_gather(gathered, mine_C, group=self.group)
        return torch.stack(gathered).cpu()

    def _dispatch(
        self, x_TD: torch.Tensor, out: Outgoing, counts: torch.Tensor
    ) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        """Send rows and weights; return the received rows [R, D], the local Routing over them
        (rows, local experts, weights) and the flat receive buffer (for the backward tie)."""
        plan, D, dev = self.plan, self.cfg.d_model, x_TD.device
        P, L, me = plan.world_size, plan.per_rank, plan.rank
        load_PE = counts[:, P : P + plan.num_experts]
        send_rows, send_assign = out.rows_to_P.tolist(), out.assign_to_P.tolist()
        recv_rows = counts[:, me].tolist()
        recv_assign = load_PE[:, plan.first : plan.first + L].sum(1).tolist()

        # per destination, its rows then its weights, in one flat buffer: one differentiable
        # all-to-all per direction (and so one backward collective order on every rank)
        x_UD, pieces, r0, a0 = x_TD[out.token_U], [], 0, 0
        weight_A = out.weight_A.to(x_TD.dtype)  # the backends weigh in the input dtype anyway
        for d in range(P):
            pieces.append(x_UD[r0 : r0 + send_rows[d]].reshape(-1))
            pieces.append(weight_A[a0 : a0 + send_assign[d]])
            r0, a0 = r0 + send_rows[d], a0 + send_assign[d]
        send_flat = torch.cat(pieces)
        in_splits = [send_rows[d] * D + send_assign[d] for d in range(P)]
        out_splits = [recv_rows[s] * D + recv_assign[s] for s in range(P)]
        recv_flat = send_flat.new_empty(sum(out_splits))
        recv_flat = _all_to_all(recv_flat, send_flat, out_splits, in_splits, self.group)
        rel_row_B = torch.empty(sum(recv_assign), dtype=torch.long, device=dev)
        dist.all_to_all_single(rel_row_B, out.rel_row_A, recv_assign, send_assign, self.group)

        x_pieces, w_pieces = [], []
        for s, part in enumerate(torch.split(recv_flat, out_splits)):
            x_pieces.append(part[: recv_rows[s] * D])
            w_pieces.append(part[recv_rows[s] * D :])
        x_RD = torch.cat(x_pieces).view(-1, D)
        recv_rows_S = torch.tensor(recv_rows, device=dev)
        row_start_B = torch.repeat_interleave(
            torch.cumsum(recv_rows_S, 0) - recv_rows_S, torch.tensor(recv_assign, device=dev)
        )
        # each source sent its assignments sorted by expert: local expert ids from the counts
        local_SL = load_PE[:, plan.first : plan.first + L].to(dev)
        expert_B = torch.repeat_interleave(
            torch.arange(L, device=dev).repeat(P), local_SL.reshape(-1)
        )
        local = _local_routing(rel_row_B + row_start_B, expert_B, torch.cat(w_pieces), x_RD, L)
        return x_RD, local, recv_flat

    def update_bias(self) -> None:
        """The router's once-per-step update from the counts of ALL ranks (the global batch,
        as in arXiv:2408.15664 Algorithm 1): all-reduce its step counts, then update; the
        global-batch balance counts start afresh, as `MoELayer.update_bias` does."""
        sync_step_counts(self.router, self.group)
        self.router.update_bias()
        reset_balance_counts(self.router)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds a copy of: the router and the shared experts."""
        params = list(self.router.parameters())
        for module in (self.shared, self.shared_gate):
            params += list(module.parameters()) if module is not None else []
        return params

    def sync_replicated_grads(self, average: bool = True) -> None:
        """All-reduce the replicated parameters' gradients over the group (mean or sum), as
        data parallelism does; call after backward, before the optimizer step."""
        for p in self.replicated_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
                if average:
                    p.grad /= self.plan.world_size

    def extra_repr(self) -> str:
        p = self.plan
        return (
            f"rank={p.rank}/{p.world_size}, experts={p.first}..{p.first + p.per_rank - 1} "
            f"of {p.num_experts}, backend={p.backend!r}"
        )


class Outgoing(NamedTuple):
    """This rank's side of the dispatch: rows sorted by destination rank, then token."""

    token_U: torch.Tensor  # [U] token of each row sent
    rows_to_P: torch.Tensor  # [P] rows sent to each rank
    assign_to_P: torch.Tensor  # [P] assignments sent to each rank
    weight_A: torch.Tensor  # [A] combine weights, sorted by expert (hence by rank)
    rel_row_A: torch.Tensor  # [A] each assignment's row inside the block sent to its rank
    max_ranks: torch.Tensor  # 0-d, the most ranks one token goes to


def _outgoing(routing: Routing, T: int, plan: EPPlan) -> Outgoing:
    """Group this rank's kept assignments by destination rank, one row per (rank, token)."""
    order_A = torch.argsort(routing.expert, stable=True)  # by expert, hence by rank
    expert_A, token_A = routing.expert[order_A], routing.token[order_A]
    dst_A = torch.div(expert_A, plan.per_rank, rounding_mode="floor")
    pair_U, row_A = torch.unique(dst_A * T + token_A, sorted=True, return_inverse=True)
    dst_U, token_U = torch.div(pair_U, T, rounding_mode="floor"), pair_U % T
    rows_to_P = torch.bincount(dst_U, minlength=plan.world_size)
    row_start_P = torch.cumsum(rows_to_P, 0) - rows_to_P
    return Outgoing(
        token_U=token_U,
        rows_to_P=rows_to_P,
        assign_to_P=torch.bincount(dst_A, minlength=plan.world_size),
        weight_A=routing.weight[order_A],
        rel_row_A=row_A - row_start_P[dst_A],
        max_ranks=torch.bincount(token_U, minlength=T).max(),
    )


def _local_routing(
    row_B: torch.Tensor, expert_B: torch.Tensor, weight_B: torch.Tensor, x_RD: torch.Tensor, L: int
) -> Routing:
    """The Routing record the local backend computes from (scores and logits unused: views)."""
    R = x_RD.shape[0]
    placeholder_RL = weight_B.new_zeros(()).expand(R, L)
    load_L = torch.bincount(expert_B, minlength=L)
    return Routing(row_B, expert_B, weight_B, placeholder_RL, placeholder_RL, load_L, load_L, R)


def _stats(counts: torch.Tensor, P: int, L: int, D: int, x_bytes: int, w_bytes: int) -> EPStats:
    """EPStats from the gathered counts [P, P + E + 2] (rows, loads, T, max ranks per token)."""
    rank_tokens = counts[:, :P].clone()
    rank_assign = counts[:, P:-2].view(P, P, L).sum(-1)
    num_tokens = int(counts[:, -2].sum())
    off = ~torch.eye(P, dtype=torch.bool)
    remote_rows, remote_assign = int(rank_tokens[off].sum()), int(rank_assign[off].sum())
    kept = int(rank_assign.sum())
    received_P = rank_tokens.sum(0).double()
    mean_received = float(received_P.mean())
    return EPStats(
        world_size=P,
        rank_tokens=rank_tokens,
        rank_assignments=rank_assign,
        num_tokens=num_tokens,
        dispatch_bytes=remote_rows * D * x_bytes + remote_assign * (w_bytes + INDEX_BYTES),
        combine_bytes=remote_rows * D * x_bytes,
        remote_fraction=remote_assign / kept if kept else 0.0,
        devices_per_token=int(rank_tokens.sum()) / max(num_tokens, 1),
        devices_per_token_max=int(counts[:, -1].max()),
        rank_imbalance=float(received_P.max()) / mean_received if mean_received else 1.0,
    )
