"""One step of one layer over P ranks: exact traffic counts and a machine-model time estimate.

Shape legend: T tokens of the step (all ranks), A kept assignments, U (token, rank) rows sent,
P ranks, N nodes (P / ranks_per_node).

Counts follow `variants.parallel.expert_parallel` exactly: a token goes ONCE to each rank that
serves one of its assignments (a row), with its assignments' weights and row indices; a row
that stays on its rank is not sent. Dispatch bytes of a row: `d_model * x_bytes`, plus
`weight_bytes + index_bytes` per assignment it carries; the combine sends the row back
(`d_model * x_bytes`). Bytes are split by direction (sent, received) and by link (intra-node:
both ranks in one node; inter-node otherwise).

Time (`Machine`): each rank has an intra-node link and an inter-node link, both full duplex
and uniform; one exchange (dispatch or combine) on rank r takes
`latency + max(intra_time, inter_time)`, a link's time being max(bytes sent, bytes received)
over its bandwidth (the two links run at once). An all-to-all ends with its slowest rank.
Expert compute on rank r: its received assignments x `flops_per_assignment` / `gemm_flops`.
The step's critical path: slowest dispatch + slowest compute + slowest combine, or with
`overlap` max(communication, compute) (compute hidden behind communication or the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .placement import Placement


@dataclass(frozen=True)
class Machine:
    """Link and compute model; defaults: DeepEP's published H800 numbers (github.com/
    deepseek-ai/DeepEP README, normal kernels: intranode dispatch/combine 153-158 GB/s over
    NVLink, internode 43-58 GB/s over RDMA; low-latency dispatch 77-194 us), the lower ends."""

    intra_gbps: float = 153.0  # GB/s per rank, NVLink within a node
    inter_gbps: float = 43.0  # GB/s per rank, RDMA between nodes
    latency_us: float = 77.0  # per exchange (DeepEP low-latency dispatch at EP8, its fastest)
    gemm_tflops: float = 400.0  # expert GEMM rate per rank, TFLOP/s (docs/expert_parallel.md)
    overlap: bool = False  # compute hidden behind communication (or the reverse)


@dataclass(frozen=True)
class Sizes:
    """Bytes and FLOPs of one row: the widths of the modelled layer, not the router's."""

    d_model: int
    expert_hidden: int
    x_bytes: int = 2  # activations (bf16)
    weight_bytes: int = 4  # combine weight per assignment (float32)
    index_bytes: int = 8  # row index per assignment (int64)

    @property
    def flops_per_assignment(self) -> float:
        """Forward FLOPs of one gated expert on one row: three D x H matrices, 2 per MAC."""
        return 6.0 * self.d_model * self.expert_hidden


@dataclass
class Step:
    """Counts and times of one step of one layer."""

    rank_rows: np.ndarray  # [P, P] rows from src (row) to dst (column)
    rank_assignments: np.ndarray  # [P, P] assignments from src to dst
    num_tokens: int
    devices_per_token: float
    devices_per_token_max: int
    nodes_per_token: float
    nodes_per_token_max: int
    dispatch_bytes: int  # off-rank, all ranks
    combine_bytes: int
    # [4, P] bytes per rank of the dispatch: sent intra, sent inter, received intra, received
    # inter; the combine's are the same with sent and received swapped
    dispatch_bytes_4P: np.ndarray
    dispatch_us: float = 0.0
    combine_us: float = 0.0
    compute_us: float = 0.0
    step_us: float = 0.0

    @property
    def rows_received(self) -> np.ndarray:
        return self.rank_rows.sum(0)

    @property
    def assignments_received(self) -> np.ndarray:
        return self.rank_assignments.sum(0)

    @property
    def straggler(self) -> float:
        """max / mean token rows received per rank (`EPStats.rank_imbalance`)."""
        rows = self.rows_received
        return float(rows.max() / rows.mean()) if rows.sum() else 1.0

    @property
    def compute_straggler(self) -> float:
        """max / mean assignments received per rank (expert GEMM rows)."""
        a = self.assignments_received
        return float(a.max() / a.mean()) if a.sum() else 1.0

    @property
    def bytes_per_token(self) -> float:
        return (self.dispatch_bytes + self.combine_bytes) / max(self.num_tokens, 1)

    @property
    def a2a_us(self) -> float:
        return self.dispatch_us + self.combine_us


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique's hash path is slow on these sizes)."""
    keys = np.sort(keys)
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys


def count(
    token_A: np.ndarray,
    dst_A: np.ndarray,
    src_T: np.ndarray,
    P: int,
    ranks_per_node: int,
    sizes: Sizes,
) -> Step:
    """Exact counts of one step: assignment (token_A -> rank dst_A), token t on rank src_T[t]."""
    T = len(src_T)
    rows_U = _distinct(dst_A.astype(np.int64) * T + token_A)  # one row per (rank, token)
    dst_U, token_U = rows_U // T, rows_U % T
    src_U, src_A = src_T[token_U], src_T[token_A]
    rank_rows = np.bincount(src_U * P + dst_U, minlength=P * P).reshape(P, P)
    rank_assign = np.bincount(src_A * P + dst_A, minlength=P * P).reshape(P, P)
    per_token = np.bincount(token_U, minlength=T)
    node_U = _distinct((dst_U // ranks_per_node) * T + token_U) % T
    nodes_per_token = np.bincount(node_U, minlength=T)
    row_bytes = sizes.d_model * sizes.x_bytes
    per_assign = sizes.weight_bytes + sizes.index_bytes
    sent_PP = rank_rows * row_bytes + rank_assign * per_assign  # dispatch bytes src -> dst
    node_P = np.arange(P) // ranks_per_node
    same_PP = node_P[:, None] == node_P[None, :]
    np.fill_diagonal(sent_PP, 0)  # a row that stays on its rank is not sent
    intra_PP, inter_PP = np.where(same_PP, sent_PP, 0), np.where(same_PP, 0, sent_PP)
    off = ~np.eye(P, dtype=bool)
    remote_rows = int(rank_rows[off].sum())
    return Step(
        rank_rows=rank_rows,
        rank_assignments=rank_assign,
        num_tokens=T,
        devices_per_token=float(per_token.mean()) if T else 0.0,
        devices_per_token_max=int(per_token.max()) if T else 0,
        nodes_per_token=float(nodes_per_token.mean()) if T else 0.0,
        nodes_per_token_max=int(nodes_per_token.max()) if T else 0,
        dispatch_bytes=int(sent_PP.sum()),
        combine_bytes=remote_rows * row_bytes,
        dispatch_bytes_4P=np.stack(
            [intra_PP.sum(1), inter_PP.sum(1), intra_PP.sum(0), inter_PP.sum(0)]
        ),
    )


def combine_bytes_4P(step: Step, sizes: Sizes, ranks_per_node: int) -> np.ndarray:
    """[4, P] combine bytes per rank (sent intra, sent inter, received intra, received inter):
    each remote row goes back to its source."""
    P = step.rank_rows.shape[0]
    back_PP = step.rank_rows.T * (sizes.d_model * sizes.x_bytes)  # dst -> src
    np.fill_diagonal(back_PP, 0)
    node_P = np.arange(P) // ranks_per_node
    same_PP = node_P[:, None] == node_P[None, :]
    intra_PP, inter_PP = np.where(same_PP, back_PP, 0), np.where(same_PP, 0, back_PP)
    return np.stack([intra_PP.sum(1), inter_PP.sum(1), intra_PP.sum(0), inter_PP.sum(0)])


def exchange_us(bytes_4P: np.ndarray, machine: Machine) -> np.ndarray:
    """[P] microseconds of one exchange per rank: latency + the slower of its two links."""
    intra_P = np.maximum(bytes_4P[0], bytes_4P[2]) / (machine.intra_gbps * 1e3)  # B / (B/us)
    inter_P = np.maximum(bytes_4P[1], bytes_4P[3]) / (machine.inter_gbps * 1e3)
    return machine.latency_us + np.maximum(intra_P, inter_P)


def estimate(step: Step, sizes: Sizes, machine: Machine, ranks_per_node: int) -> Step:
    """Fill the step's times from the machine model (module docstring)."""
    dispatch_P = exchange_us(step.dispatch_bytes_4P, machine)
    combine_P = exchange_us(combine_bytes_4P(step, sizes, ranks_per_node), machine)
    compute_P = step.assignments_received * sizes.flops_per_assignment / (machine.gemm_tflops * 1e6)
    step.dispatch_us, step.combine_us = float(dispatch_P.max()), float(combine_P.max())
    step.compute_us = float(compute_P.max())
    comm = step.dispatch_us + step.combine_us
    step.step_us = max(comm, step.compute_us) if machine.overlap else comm + step.compute_us
    return step


def simulate(
    token_A: np.ndarray,
    expert_A: np.ndarray,
    src_T: np.ndarray,
    placement: Placement,
    ranks_per_node: int,
    sizes: Sizes,
    machine: Machine,
) -> Step:
    """Counts and times of one step: assignments (token, expert) served as `placement` says."""
    P = len(placement.slots_per_rank)
    dst_A = placement.rank_of(token_A, expert_A)
    step = count(token_A, dst_A, src_T, P, ranks_per_node, sizes)
    return estimate(step, sizes, machine, ranks_per_node)
