"""TinyLM: a small decoder-only transformer whose FFN is any registered variant.

Shape legend: B sequences, S sequence length, D model width, V vocabulary (256 bytes),
N attention heads, H head width (D / N).

nanoGPT-like (Radford et al. 2019 layout): learned positional embeddings, pre-norm blocks
`x + attn(norm(x))`, `x + ffn(norm(x))`, a final norm, and an output head tied to the token
embedding. Departures from GPT-2, chosen to match the MoE models being compared:
- RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) instead of LayerNorm, as in Mixtral and
  DeepSeek-V2/V3; no bias in any linear layer.
- The FFN of each block is whatever `ffn_factory(layer_idx)` returns: a `variants` layer whose
  output is a `MoEOutput`; blocks take `out.y` and keep the losses and routing of MoE layers.
  Every FFN gets the input ids (`token_ids=`, [B, S]): hash routing reads them, others ignore.
- Per-depth variants: the i-th MoE block gets the variant config's `at_depth(i)` (the same
  config for most variants; DeepSeek-V4's first `hash_layers` MoE blocks route by token id).

Which blocks are MoE: with `moe_every = n`, block i is MoE when `(i + 1) % n == 0`, so n = 2
gives the "every other layer" placement of GShard (Lepikhin et al. 2020, Sec. 2.1) and Switch
(Fedus et al. 2021, Sec. 2); n = 1 makes every block MoE. The other blocks get a dense FFN of
the same active width (`build_lm`), so every block costs the same FLOPs per token.

`checkpoint=True` checkpoints each block's FFN (`torch.utils.checkpoint`, non-reentrant): its
activations are recomputed in backward, and the layer's statistics (bias loads, ReMoE's
sparsity counts, global-batch balance counts) still change once per forward
(`variants.contract.recompute`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import variants
from moe_bench.isocompute import dense_reference
from variants import MoEOutput, Routing
from variants.contract.config import check_divides, check_int, check_le, check_number
from variants.contract.recompute import checkpointed


@dataclass
class LMConfig:
    vocab_size: int = 256  # byte-level: one token per UTF-8 byte, no tokenizer to download
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128  # maximum sequence length (size of the positional table)
    moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0
    dropout: float = 0.0
    tie_embeddings: bool = True
    checkpoint: bool = False  # activation checkpointing of every block's FFN

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "moe_every"):
            check_int(self, name, 1)
        check_divides(self, "n_heads", "d_model")
        check_le(self, "moe_every", "n_layers")  # at least one MoE block
        check_number(self, "dropout", minimum=0)
        if self.dropout >= 1:
            raise ValueError(f"dropout={self.dropout} must be < 1")
        for name in ("tie_embeddings", "checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")

    def is_moe(self, layer_idx: int) -> bool:
        return (layer_idx + 1) % self.moe_every == 0

    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is the variant under test."""
        return [i for i in range(self.n_layers) if self.is_moe(i)]


@dataclass
class LayerOutput:
    """What one MoE block reports: its index, its weighted losses and its routing."""

    layer: int
    losses: dict[str, torch.Tensor]
    routing: Routing


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None  # mean next-token cross-entropy in nats; None without targets
    aux_loss: torch.Tensor  # 0-d, sum of the MoE blocks' aux losses; objective = loss + aux_loss
    layers: list[LayerOutput]  # one per MoE block, in block order


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        N = self.n_heads
        q_BSD, k_BSD, v_BSD = self.qkv(x_BSD).split(D, dim=-1)
        q_BNSH, k_BNSH, v_BNSH = (
            t.view(B, S, N, D // N).transpose(1, 2) for t in (q_BSD, k_BSD, v_BSD)
        )
        y_BNSH = F.scaled_dot_product_attention(
            q_BNSH, k_BNSH, v_BNSH, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y_BNSH.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm_ffn = nn.RMSNorm(cfg.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)
        self.checkpoint = cfg.checkpoint

    def forward(
        self,
        x_BSD: torch.Tensor,
        gate_residual: torch.Tensor | None = None,
        token_ids_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEOutput]:
        x_BSD = x_BSD + self.drop(self.attn(self.norm_attn(x_BSD)))
        # [B, S, D] in: the layer counts B sequences (DeepSeek-V3's loss is per sequence)
        kwargs: dict = {"token_ids": token_ids_BS}
        if self.ffn.cfg.takes_gate_residual:  # MoE++: the previous MoE layer's gate logits
            kwargs["gate_residual"] = gate_residual
        if self.checkpoint and self.training:
            out = checkpointed(self.ffn, self.norm_ffn(x_BSD), **kwargs)
        else:
            out = self.ffn(self.norm_ffn(x_BSD), **kwargs)
        return x_BSD + self.drop(out.y), out


class TinyLM(nn.Module):
    def __init__(self, cfg: LMConfig, ffn_factory: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, ffn_factory(i)) for i in range(cfg.n_layers))
        self.norm_out = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """GPT-2 init for the LM's own weights; the FFN layers keep their variant's init.

        std 0.02 everywhere, and 0.02 / sqrt(2 n_layers) on the attention output projection
        (GPT-2's residual scaling, Radford et al. 2019, Sec. 2.3).
        """
        for module in (self.tok_emb, self.pos_emb, self.head):
            nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / (2 * self.cfg.n_layers) ** 0.5)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> LMOutput:
        length = idx_BS.shape[1]
        if length > self.cfg.seq_len:
            raise ValueError(f"sequence length {length} must be <= seq_len={self.cfg.seq_len}")
        pos_S = torch.arange(length, device=idx_BS.device)
        x_BSD = self.drop(self.tok_emb(idx_BS) + self.pos_emb(pos_S))
        layers, aux = [], torch.zeros((), device=idx_BS.device)
        gate_logits = None  # chained from MoE layer to MoE layer where a layer takes them
        for i, block in enumerate(self.blocks):
            x_BSD, out = block(x_BSD, gate_logits, idx_BS)
            if self.cfg.is_moe(i):
                layers.append(LayerOutput(i, out.losses, out.routing))
                aux = aux + out.aux_loss
                gate_logits = out.extras.get("gate_logits")
        logits_BSV = self.head(self.norm_out(x_BSD))
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
        return LMOutput(logits=logits_BSV, loss=loss, aux_loss=aux, layers=layers)

    def update_bias(self) -> None:
        """Loss-free balancing step of every FFN (a no-op where there is no bias)."""
        for block in self.blocks:
            block.ffn.update_bias()


def build_lm(variant: str, fields: dict[str, Any], cfg: LMConfig) -> TinyLM:
    """TinyLM with variant `variant` (config `fields`) in its MoE blocks, dense FFNs elsewhere.

    `d_model` comes from `cfg` (a different `fields["d_model"]` is an error). The dense blocks
    (moe_every > 1) get the dense FFN of the same active expert FLOPs per token and the same
    activation (`isocompute.dense_reference`).
    """
    if fields.get("d_model", cfg.d_model) != cfg.d_model:
        raise ValueError(
            f"variant d_model={fields['d_model']} must equal model d_model={cfg.d_model}"
        )
    fields = {**fields, "d_model": cfg.d_model}
    dense_fields = dense_reference(variants.make_config(variant, **fields))
    moe_index = {layer: i for i, layer in enumerate(cfg.moe_layers())}

    def ffn_factory(layer_idx: int) -> nn.Module:
        if cfg.is_moe(layer_idx):  # a fresh config per layer, as at depth moe_index
            layer_cfg = variants.make_config(variant, **fields).at_depth(moe_index[layer_idx])
            return variants.build_config(layer_cfg)
        return variants.build("dense", **dense_fields)

    return TinyLM(cfg, ffn_factory)
