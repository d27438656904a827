"""Routing rules at P ranks: which K experts each token may pick, given the ranks and nodes
that hold them.

Shape legend: T tokens, E routed experts, K experts per token, G groups (ranks or nodes).

A rule restricts a router's top-K selection by where experts live:
- `topk`: unrestricted top-K of the selection scores.
- `device:M`: DeepSeek-V2 device-limited routing (arXiv:2405.04434 Sec. 2.2.2): a token first
  picks the M ranks holding its highest-scoring experts (a rank's score is its best expert's),
  then its top-K among their experts; it reaches at most M ranks.
- `node:M`: DeepSeek-V3 node-limited routing (arXiv:2412.19437 Sec. 2.1.2): a node's score is
  the sum of its K/M highest selection scores; a token picks among the experts of its M best
  nodes; it reaches at most M nodes.
The masks are the variants' own (`variants.contract.routing.group_limited_mask`), applied to
the experts reordered by their home rank, so a non-contiguous placement groups the experts
that actually share a rank. Selection scores are the router's (e.g. DeepSeek-V3's sigmoid plus
its bias); a rule only changes which experts are chosen, never the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from variants.contract.routing import group_limited_mask

KINDS = ("topk", "device", "node")


@dataclass(frozen=True)
class Rule:
    kind: str  # one of KINDS
    limit: int = 0  # M ranks (device) or nodes (node); 0 for topk

    @classmethod
    def parse(cls, text: str) -> Rule:
        """'topk', 'device:M' or 'node:M'."""
        kind, _, limit = text.partition(":")
        if kind not in KINDS or (kind == "topk") != (limit == "") or not _positive(limit):
            raise ValueError(
                f"task.rules holds {text!r}; allowed: 'topk', 'device:M' or 'node:M' with M >= 1"
            )
        return cls(kind, int(limit or 0))

    @property
    def name(self) -> str:
        return self.kind if self.kind == "topk" else f"{self.kind}:{self.limit}"


def _positive(text: str) -> bool:
    return text == "" or (text.isdigit() and int(text) >= 1)


def applicable(rule: Rule, E: int, K: int, P: int, ranks_per_node: int) -> str | None:
    """None when the rule can route at this layout, else why not (one line)."""
    if rule.kind == "device" and rule.limit < P and rule.limit * (E // P) < K:
        return (
            f"rule {rule.name}: {rule.limit} ranks of {E // P} experts hold fewer than "
            f"top_k={K} experts (device-limited routing needs M * E/P >= K)"
        )
    nodes = P // ranks_per_node
    splits = K % rule.limit == 0 and K // rule.limit <= E // nodes if rule.limit else True
    if rule.kind == "node" and rule.limit < nodes and not splits:
        return (
            f"rule {rule.name}: top_k={K} must split into {rule.limit} nodes of at most "
            f"{E // nodes} experts (node-limited routing takes K/M per node)"
        )
    return None


def select(sel_TE: np.ndarray, rule: Rule, home_E: np.ndarray, K: int, ranks_per_node: int):
    """expert_TK (int64): each token's K experts under `rule`, experts grouped by their home
    rank `home_E` (nodes: ranks // ranks_per_node). Raises ValueError if not applicable."""
    E = sel_TE.shape[1]
    P = int(home_E.max()) + 1
    why = applicable(rule, E, K, P, ranks_per_node)
    if why:
        raise ValueError(why)
    order_E = np.argsort(home_E, kind="stable")  # experts of one rank next to each other
    s_TE = torch.from_numpy(np.ascontiguousarray(sel_TE[:, order_E], dtype=np.float32))
    groups = {"device": P, "node": P // ranks_per_node}.get(rule.kind, 1)
    if rule.kind != "topk" and rule.limit < groups:
        per_group = 1 if rule.kind == "device" else K // rule.limit
        allowed_TE = group_limited_mask(s_TE, groups, rule.limit, per_group)
        s_TE = s_TE.masked_fill(~allowed_TE, float("-inf"))
    picked_TK = s_TE.topk(K, dim=-1).indices.numpy()
    return order_E[picked_TK]
