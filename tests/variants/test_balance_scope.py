"""`balance_scope` on the auxiliary-loss variants: micro_batch, sequence, and global_batch
(Qiu et al. 2025, arXiv:2501.11873: f_i counted over every micro-batch of the step and every
data-parallel rank; P_i stays the micro-batch's)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import variants

from .helpers import with_logits

AUX = {
    "switch": dict(top_k=1, capacity_factor=None),
    "gshard": dict(top_k=2),
    "deepseek_moe": dict(top_k=2, num_shared_experts=0),
    "deepseek_v2": dict(top_k=2, num_devices=2, max_devices=2, num_shared_experts=0),
    "deepseek_v3": dict(top_k=2, num_groups=1, topk_groups=1, num_shared_experts=0),
    "mixtral": dict(top_k=2),
    "topp": dict(),
    "xmoe": dict(top_k=2),
    "moe_plus_plus": dict(top_k=2),
}
A = torch.tensor([[3.0, 2.0, 0.0, 0.0], [3.0, 0.0, 2.0, 0.0]])  # mixtral picks {0,1}, {0,2}
B = torch.tensor([[0.0, 0.0, 2.0, 3.0], [0.0, 2.0, 0.0, 3.0]])  # {3,2}, {3,1}


def mixtral_balance(probs: torch.Tensor, counts: torch.Tensor) -> float:
    share = counts / counts.sum()
    return 0.01 * 4 * float((share * probs.mean(0)).sum())


def test_micro_batch_is_the_default_and_counts_this_forward() -> None:
    layer, x = with_logits("mixtral", B)
    assert layer.cfg.balance_scope == "micro_batch"
    loss = layer.train()(x).losses["balance"].item()
    expected = mixtral_balance(torch.softmax(B, -1), torch.tensor([0.0, 1.0, 1.0, 2.0]))
    assert loss == pytest.approx(expected, rel=1e-6)


def test_global_batch_counts_every_micro_batch_of_the_step() -> None:
    layer, x = with_logits("mixtral", A, balance_scope="global_batch")
    layer.train()
    layer(x)  # micro-batch A: counts [2, 1, 1, 0]
    with torch.no_grad():
        layer.router.weight.copy_(B.T)
    loss = layer(x).losses["balance"].item()  # micro-batch B: counts [0, 1, 1, 2]
    expected = mixtral_balance(torch.softmax(B, -1), torch.tensor([2.0, 2.0, 2.0, 2.0]))
    assert loss == pytest.approx(expected, rel=1e-6)
    layer.update_bias()  # next step starts afresh: B alone again
    loss = layer(x).losses["balance"].item()
    expected = mixtral_balance(torch.softmax(B, -1), torch.tensor([0.0, 1.0, 1.0, 2.0]))
    assert loss == pytest.approx(expected, rel=1e-6)


def test_set_balance_counts_fixes_the_step_counts() -> None:
    layer, x = with_logits("mixtral", B, balance_scope="global_batch")
    layer.train().set_balance_counts(torch.tensor([5.0, 1.0, 1.0, 1.0]))
    for _ in range(2):  # fixed: further forwards do not add to them
        loss = layer(x).losses["balance"].item()
        expected = mixtral_balance(torch.softmax(B, -1), torch.tensor([5.0, 1.0, 1.0, 1.0]))
        assert loss == pytest.approx(expected, rel=1e-6)
    layer.update_bias()
    assert layer.router.fixed_balance_counts is None


def test_eval_forwards_count_nothing() -> None:
    layer, x = with_logits("mixtral", A, balance_scope="global_batch")
    layer.eval()(x)
    assert getattr(layer.router, "balance_counts", None) is None


def test_sequence_scope_averages_per_sequence_terms() -> None:
    layer, _ = with_logits("mixtral", torch.cat([A, B]), balance_scope="sequence")
    x = torch.eye(4).view(2, 2, 4)  # sequence 0 = A's tokens, sequence 1 = B's
    loss = layer.train()(x).losses["balance"].item()
    seq_a = mixtral_balance(torch.softmax(A, -1), torch.tensor([2.0, 1.0, 1.0, 0.0]))
    seq_b = mixtral_balance(torch.softmax(B, -1), torch.tensor([0.0, 1.0, 1.0, 2.0]))
    assert loss == pytest.approx((seq_a + seq_b) / 2, rel=1e-6)


def test_global_batch_all_reduces_over_ranks(tmp_path) -> None:
    """A one-rank gloo group: the all-reduce path runs and sums (here: itself)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        layer, x = with_logits("mixtral", A, balance_scope="global_batch")
        layer.train()(x)
        assert layer.router.balance_counts.tolist() == [2.0, 1.0, 1.0, 0.0]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(AUX))
@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "global_batch"])
def test_every_aux_loss_variant_takes_every_scope(name: str, scope: str) -> None:
    layer = variants.build(
        name, d_model=8, num_experts=4, expert_hidden=8, balance_scope=scope, **AUX[name]
    ).train()
    x = torch.randn(2, 5, 8)
    for _ in range(2):
        out = layer(x)
        assert torch.isfinite(out.losses["balance"]) and out.losses["balance"].requires_grad
    layer.update_bias()


def test_paper_scopes_are_the_defaults() -> None:
    assert variants.make_config("deepseek_v2").balance_scope == "sequence"
    assert variants.make_config("deepseek_v3").balance_scope == "sequence"
    assert variants.make_config("switch").balance_scope == "micro_batch"


@pytest.mark.parametrize("name", list(AUX))
def test_bad_scope_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="balance_scope='step' is not one of"):
        variants.build(name, balance_scope="step")
