"""Router replay: a recorded step, replayed in another run, backend or precision, gives the
recorded routing and outputs; replay changes no state; bad assignments fail with one line."""

from __future__ import annotations

import pytest
import torch

import variants
from moe_bench.lm import LMConfig, build_lm
from moe_bench.replay import record, replaying
from moe_bench.trace import load_trace
from moe_bench.trace_recorder import step_arrays

SMALL = dict(num_experts=4, expert_hidden=8, top_k=2)
FIELDS = {
    "mixtral": SMALL,
    "deepseek_v3": dict(SMALL, num_groups=1, topk_groups=1, num_shared_experts=1),
    "topp": dict(num_experts=4, expert_hidden=8),
    "switch": dict(num_experts=4, expert_hidden=8, capacity_factor=1.0),  # drops recorded too
}


def _lm(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LMConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8)
    return build_lm(name, {**FIELDS[name], **overrides}, cfg)


def _idx() -> torch.Tensor:
    return torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))


def _recorded(name: str, tmp_path) -> tuple[torch.Tensor, object]:
    lm = _lm(name).eval()
    with torch.no_grad():
        out = lm(_idx())
    record(tmp_path, [step_arrays(out, 7, _idx())], lm, {"variant": name})
    return out.logits, load_trace(tmp_path)


@pytest.mark.parametrize("name", list(FIELDS))
def test_a_replayed_step_gives_the_recorded_outputs(name: str, tmp_path) -> None:
    logits, trace = _recorded(name, tmp_path)
    assert trace.steps == [7] and trace.layers == [0, 1]
    # another run: same weights, another backend, and routers moved so they would route
    # otherwise on their own
    lm = _lm(name, backend="grouped").eval()
    with torch.no_grad():
        for i in lm.cfg.moe_layers():
            lm.blocks[i].ffn.router.weight.mul_(-3.0)
        own = lm(_idx())
        with replaying(lm, trace, 7):
            replayed = lm(_idx())
    assert not torch.allclose(own.logits, logits, atol=1e-3)  # left alone, it routes otherwise
    torch.testing.assert_close(replayed.logits, logits, rtol=1e-5, atol=1e-6)
    for rec in replayed.layers:
        want = trace.routing_of(7, rec.layer)
        assert rec.routing.token.tolist() == want["token_A"].tolist()
        assert rec.routing.expert.tolist() == want["expert_A"].tolist()
    assert all(router.forced is None for router in (b.ffn.router for b in lm.blocks))


def test_two_precisions_compared_on_identical_decisions(tmp_path) -> None:
    """bf16 autocast replaying the fp32 decisions: the routing is the same by construction,
    so what differs is the arithmetic alone (bf16 keeps 8 significant bits)."""
    logits, trace = _recorded("mixtral", tmp_path)
    lm = _lm("mixtral").eval()
    with torch.no_grad(), replaying(lm, trace, 7), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(_idx())
    for rec in out.layers:
        assert rec.routing.expert.tolist() == trace.routing_of(7, rec.layer)["expert_A"].tolist()
    rel = float((out.logits.float() - logits).abs().max() / logits.abs().max())
    assert 0 < rel < 8 * 2.0**-8


def test_replay_counts_nothing_and_trains_nothing() -> None:
    layer = variants.build("deepseek_v3", d_model=8, **FIELDS["deepseek_v3"]).train()
    layer.router.replay((torch.tensor([0, 1]), torch.tensor([3, 2]), torch.tensor([1.0, 0.5])))
    out = layer(torch.randn(2, 8))
    assert out.routing.expert.tolist() == [3, 2] and out.losses == {}
    assert int(layer.router.load_count.sum()) == 0


def test_bad_replays_fail_with_one_line() -> None:
    router = variants.build("mixtral", d_model=8, **SMALL).router
    with pytest.raises(ValueError, match=r"replayed expert ids 0..4 must be in 0..3"):
        router.replay((torch.tensor([0, 1]), torch.tensor([0, 4]), torch.ones(2)))
    with pytest.raises(ValueError, match="differ in length"):
        router.replay((torch.tensor([0]), torch.tensor([0, 1]), torch.ones(2)))
    router.replay((torch.tensor([0, 5]), torch.tensor([0, 1]), torch.ones(2)))
    with pytest.raises(ValueError, match=r"replayed token ids 0..5 must be in 0..1"):
        router(torch.randn(2, 8))
    mpp = variants.build("moe_plus_plus", d_model=8, num_experts=4, expert_hidden=8)
    mpp.router.replay((torch.tensor([0]), torch.tensor([0]), torch.ones(1)))
    with pytest.raises(ValueError, match="moe_plus_plus cannot replay"):
        mpp(torch.randn(2, 8))
