"""hash: each token's experts are a fixed table of its id (Hash Layers, Roller et al. 2021,
arXiv:2106.04426), the learned gate only weighting them (DeepSeek-V4's hash layers).

Shape legend: T tokens, D model width, E routed experts, K experts per token, V vocabulary
(token ids 0..V-1), A assignments.

- Selection: expert_TK = tid2eid[token_ids], a [V, K] table fixed at construction (a buffer,
  saved with the model; HF `DeepseekV4HashRouter.tid2eid`). Nothing learned chooses, so the
  routing cannot collapse and needs no balance loss; its load follows the ids' frequencies.
- The table: each id gets K distinct experts drawn uniformly at random (a random permutation
  of the E experts per id, its first K) from a generator seeded with `hash_seed`, so every
  replica builds the same table. K = 1 is Roller et al.'s random hash (a fixed random
  assignment of each vocabulary id to one expert; with their balanced hash, the one the paper
  finds works best). Their balanced, bigram and clustered hashes are not built. DeepSeek-V4
  loads its table from the checkpoint (HF initialises it to zeros): how it was built is not in
  the HF code, so a random table stands in for it.
- Weight (DeepSeek-V4, HF `DeepseekV4HashRouter`): s = score(x W^T) (`score`, as deepseek_v3:
  sigmoid, softmax or sqrtsoftplus), w = s_sel / sum of the K selected s (`norm_topk_prob`)
  times `routed_scaling_factor`. With K = 1 and normalisation the weight is exactly the scale:
  Roller et al.'s Hash Layer, whose FFN output is not gated.
- `token_ids` are required (`uses_token_ids`): a forward without them, or with an id outside
  0..vocab_size-1, is a ValueError. Shared experts: `SharedExpertConfig`'s options.
- Dropless; no auxiliary loss; `update_bias()` does nothing.

Defaults: top-1 (Roller et al.), vocab_size 256 (the tiny LM's bytes), no shared expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .compute.assignments import Routing, make_routing
from .contract.config import SharedExpertConfig, check_choice, check_int, check_number
from .contract.routing import SCORES, Router, flatten_topk, norm_topk


@dataclass
class HashConfig(SharedExpertConfig):
    note: ClassVar[str] = (
        "No auxiliary loss: a fixed random token-id → experts table chooses (Roller et al. "
        "2021); the load follows the ids' frequencies."
    )
    dropless: ClassVar[str | None] = "hash routing computes every token's table experts"
    uses_token_ids: ClassVar[bool] = True
    top_k: int = 1
    vocab_size: int = 256
    hash_seed: int = 0
    score: str = "softmax"
    norm_topk_prob: bool = True  # K = 1: weight 1, Roller et al.'s ungated Hash Layer
    routed_scaling_factor: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_int(self, "vocab_size", 1)
        check_int(self, "hash_seed", 0)
        check_choice(self, "score", tuple(SCORES))
        check_number(self, "routed_scaling_factor", positive=True)


def random_hash_table(vocab_size: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """[V, K] long: per id, the first K of a uniformly random permutation of the E experts."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(vocab_size, num_experts, generator=gen).argsort(-1)[:, :k].contiguous()


class HashRouter(Router):
    def __init__(self, cfg: HashConfig) -> None:
        super().__init__(cfg)
        table_VK = random_hash_table(cfg.vocab_size, cfg.num_experts, cfg.top_k, cfg.hash_seed)
        self.register_buffer("tid2eid", table_VK)

    def score(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return SCORES[self.cfg.score](logits_TE)

    def route(
        self, x_TD: torch.Tensor, num_seqs: int, token_ids: torch.Tensor | None = None
    ) -> tuple[Routing, dict[str, torch.Tensor]]:
        cfg = self.cfg
        if token_ids is None:
            raise ValueError(
                "token_ids=None: hash routing chooses experts by token id; pass "
                "token_ids= (integer ids, x's shape without its last dim)"
            )
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= cfg.vocab_size):
            bad = int(token_ids.max() if token_ids.max() >= cfg.vocab_size else token_ids.min())
            raise ValueError(f"token id {bad} must be in 0..vocab_size-1={cfg.vocab_size - 1}")
        logits_TE = self.logits(x_TD)
        s_TE = self.score(logits_TE)
        expert_TK = self.tid2eid[token_ids.to(self.tid2eid.device)]
        weight_TK = norm_topk(s_TE.gather(1, expert_TK), cfg.norm_topk_prob)
        token_A, expert_A, weight_A = flatten_topk(expert_TK, weight_TK * cfg.routed_scaling_factor)
        demand_E = torch.bincount(expert_A, minlength=cfg.num_experts)
        return make_routing(token_A, expert_A, weight_A, s_TE, logits_TE, demand_E), {}
