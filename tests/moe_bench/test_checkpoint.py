"""`model.checkpoint=true`: activation checkpointing of the MoE layers, statistics counted once.

Without care the recompute in backward runs the router again: DeepSeek-V3's bias load, ReMoE's
sparsity counts and the running global-batch counts are then counted twice
(pytorch/torchtitan#1593). These tests train one step with and without checkpointing and
compare the counts, the losses and every gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moe_bench.config import resolve
from moe_bench.identity import config_key
from moe_bench.lm import LMConfig, build_lm
from moe_bench.tasks.convergence import build_model
from variants.contract.recompute import checkpointed

SMALL = dict(num_experts=4, expert_hidden=8, top_k=2)
CASES = {
    "deepseek_v3": dict(SMALL, num_groups=1, topk_groups=1, num_shared_experts=0),
    "remoe": dict(SMALL),
    "mixtral": dict(SMALL, balance_scope="global_batch"),
    "gshard": dict(SMALL, balance_scope="global_batch"),  # random second choices replayed
}


def _lm(name: str, checkpoint: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LMConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, checkpoint=checkpoint)
    return build_lm(name, CASES[name], cfg).train()


def _step(lm: torch.nn.Module, micro: int = 2) -> tuple[float, dict[str, torch.Tensor]]:
    """One step of two micro-batches; the aux loss and the counts before `update_bias`."""
    idx = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    aux = 0.0
    for idx_bS in idx.split(micro):
        out = lm(idx_bS, idx_bS)
        ((out.loss + out.aux_loss) / 2).backward()
        aux += float(out.aux_loss.detach()) / 2
    counts = {
        f"{name}.{attr}": getattr(mod, attr).clone()
        for name, mod in lm.named_modules()
        for attr in ("load_count", "active_count", "slot_count", "balance_counts")
        if isinstance(getattr(mod, attr, None), torch.Tensor)
    }
    return aux, counts


@pytest.mark.parametrize("name", list(CASES))
def test_checkpointing_counts_once_and_changes_no_gradient(name: str) -> None:
    plain, ckpt = _lm(name, False), _lm(name, True)
    aux_plain, counts_plain = _step(plain)
    aux_ckpt, counts_ckpt = _step(ckpt)
    assert counts_plain, "the case has no counts to check"
    assert aux_ckpt == aux_plain
    for key, value in counts_plain.items():
        assert torch.equal(counts_ckpt[key], value), f"{name} {key} counted differently"
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7), f"{name} grad {n}"
    plain.update_bias()
    ckpt.update_bias()
    for (n, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), f"{name} {n} after update_bias"


def test_plain_checkpointing_counts_twice() -> None:
    """The bug the rule prevents: torch's checkpoint alone counts V3's load in the recompute."""
    lm = _lm("deepseek_v3", False)
    layer = lm.blocks[0].ffn
    x = torch.randn(2, 8, 16, requires_grad=True)
    for run in (checkpointed, lambda m, x: checkpoint(m, x, use_reentrant=False)):
        layer.router.load_count.zero_()
        out = run(layer, x)
        once = out.routing.load.clone()
        (out.y.sum() + out.aux_loss).backward()
        doubled = torch.equal(layer.router.load_count, 2 * once)
        assert doubled == (run is not checkpointed)


def test_checkpoint_is_a_bool() -> None:
    with pytest.raises(ValueError, match="checkpoint=1 must be true or false"):
        LMConfig(checkpoint=1)


def test_checkpoint_off_keeps_the_config_key_of_before() -> None:
    """model.checkpoint was added at false: there a job's key is the key it had before the
    field existed (resume, arms); true is part of the key."""
    assert config_key({"variant": "switch", "model.checkpoint": False}) == {"variant": "switch"}
    on = config_key({"variant": "switch", "model.checkpoint": True})
    assert on == {"variant": "switch", "model.checkpoint": True}


def test_model_checkpoint_reaches_the_convergence_lm(compose_cfg) -> None:
    cfg = compose_cfg("task=convergence", "variant=mixtral", "model=tiny", "model.checkpoint=true")
    lm = build_model(resolve(cfg))
    assert all(block.checkpoint for block in lm.blocks)
