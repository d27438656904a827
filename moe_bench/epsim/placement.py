"""Expert placement over P ranks: which ranks hold a copy of each expert, and which copy serves
an assignment.

Shape legend: E logical experts, P ranks, R physical copies (slots) over all ranks.

- `contiguous`: expert e on rank e // (E/P), one copy (what `ExpertParallel` does).
- `round_robin`: expert e on rank e % P, one copy.
- `eplb`: DeepSeek's expert-parallel load balancer (github.com/deepseek-ai/EPLB, `eplb.py`,
  hierarchical policy; the redundant experts of DeepSeek-V3, arXiv:2412.19437 Sec. 3.4): from
  the per-expert load of earlier steps, each node gives its `redundant_per_rank` x ranks spare
  slots to its hottest experts one at a time (the expert of highest load per copy gets the
  next copy, EPLB's `replicate_experts`), then packs the copies onto its ranks, heaviest
  first, each onto the least-loaded rank with a free slot (EPLB's `balanced_packing`); a hot
  expert's assignments are split evenly over its copies. Where ours differs: EPLB first packs
  expert groups onto nodes by load; here a group stays on the node of the contiguous layout
  (the node-limited rule's groups are the nodes), so only the within-node steps are done;
  packing prefers a rank that holds no copy of that expert yet; an assignment goes to copy
  (token mod copies) of its expert, so copies share an expert's tokens evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLACEMENTS = ("contiguous", "round_robin", "eplb")


@dataclass(frozen=True)
class Placement:
    """Copies sorted by expert: copy `first_E[e] + i` (i < `count_E[e]`) lives on `rank_R`."""

    name: str
    home_E: np.ndarray  # the rank whose expert group the routing rule counts e in
    rank_R: np.ndarray
    first_E: np.ndarray
    count_E: np.ndarray

    @property
    def slots_per_rank(self) -> np.ndarray:
        return np.bincount(self.rank_R, minlength=int(self.home_E.max()) + 1)

    def rank_of(self, token_A: np.ndarray, expert_A: np.ndarray) -> np.ndarray:
        """The rank serving each assignment: copy (token mod copies) of its expert."""
        copy_A = self.first_E[expert_A] + token_A % self.count_E[expert_A]
        return self.rank_R[copy_A]


def _single(name: str, home_E: np.ndarray) -> Placement:
    E = len(home_E)
    return Placement(name, home_E, home_E.copy(), np.arange(E), np.ones(E, dtype=np.int64))


def contiguous(E: int, P: int) -> Placement:
    return _single("contiguous", np.arange(E) // (E // P))


def round_robin(E: int, P: int) -> Placement:
    return _single("round_robin", np.arange(E) % P)


def eplb(load_E: np.ndarray, P: int, ranks_per_node: int, redundant_per_rank: int) -> Placement:
    """The load-aware placement of the module docstring, from `load_E` (assignments per expert
    on earlier steps); contiguous homes, `redundant_per_rank` spare slots on every rank."""
    E = len(load_E)
    L, n = E // P, ranks_per_node
    home_E = np.arange(E) // L
    copies: list[tuple[int, int]] = []  # (expert, rank)
    for node in range(P // n):
        experts = np.arange(node * n * L, (node + 1) * n * L)
        count = np.ones(len(experts), dtype=np.int64)
        load = load_E[experts].astype(np.float64) + 1e-9  # ties: the lower expert id first
        for _ in range(n * redundant_per_rank):  # EPLB replicate_experts: max load per copy
            count[np.argmax(load / count)] += 1
        items = [
            (load[i] / count[i], int(e)) for i, e in enumerate(experts) for _ in range(count[i])
        ]
        items.sort(key=lambda item: (-item[0], item[1]))
        rank_load = np.zeros(n)
        free = np.full(n, L + redundant_per_rank)
        held: list[set[int]] = [set() for _ in range(n)]
        for weight, e in items:  # EPLB balanced_packing: heaviest first, least-loaded rank
            open_ranks = [r for r in range(n) if free[r] > 0]
            fresh = [r for r in open_ranks if e not in held[r]] or open_ranks
            r = min(fresh, key=lambda r: (rank_load[r], r))
            rank_load[r] += weight
            free[r] -= 1
            held[r].add(e)
            copies.append((e, node * n + r))
    copies.sort()
    expert_R = np.array([e for e, _ in copies])
    rank_R = np.array([r for _, r in copies])
    count_E = np.bincount(expert_R, minlength=E)
    first_E = np.cumsum(count_E) - count_E
    return Placement("eplb", home_E, rank_R, first_E, count_E)


def build(
    name: str,
    E: int,
    P: int,
    ranks_per_node: int,
    load_E: np.ndarray | None = None,
    redundant_per_rank: int = 1,
) -> Placement:
    """A placement by name (`PLACEMENTS`); `eplb` needs the earlier steps' `load_E`."""
    if E % P:
        raise ValueError(f"num_experts={E} must be divisible by ranks={P} (E/P experts a rank)")
    if P % ranks_per_node:
        raise ValueError(f"ranks={P} must be divisible by task.ranks_per_node={ranks_per_node}")
    if name == "contiguous":
        return contiguous(E, P)
    if name == "round_robin":
        return round_robin(E, P)
    if name == "eplb":
        if load_E is None:
            raise ValueError("placement 'eplb' needs the per-expert load of earlier steps")
        return eplb(load_E, P, ranks_per_node, redundant_per_rank)
    raise ValueError(f"task.placements holds {name!r}; allowed: {', '.join(PLACEMENTS)}")
