"""The expert-parallel simulator (moe_bench/epsim) on hand-counted cases, its rules against the
variants' routers, its placements, and the routing trace a training run records.

The exact match with measured gloo ranks is tests/moe_bench/test_epsim_gloo.py (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import variants
from moe_bench.epsim import placement
from moe_bench.epsim.replay import Layout, replay, selection_scores
from moe_bench.epsim.rules import Rule, select
from moe_bench.epsim.traffic import Machine, Sizes, count, estimate, simulate
from moe_bench.lm import LMConfig, build_lm
from moe_bench.tasks.ep_sim import EPSimConfig
from moe_bench.trace import load_trace
from moe_bench.trace_recorder import TraceRecorder


def hand_case():
    """2 ranks (one node each), 4 experts (2 a rank), top-2, tokens 0-1 on rank 0, 2-3 on 1:
    t0 -> e0 e1 (rank 0 only), t1 -> e1 e2 (ranks 0, 1), t2 -> e2 e3 (rank 1), t3 -> e0 e3."""
    token_A = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    expert_A = np.array([0, 1, 1, 2, 2, 3, 0, 3])
    return token_A, expert_A, np.array([0, 0, 1, 1])


def test_a_hand_counted_step() -> None:
    token_A, expert_A, src_T = hand_case()
    plan = placement.contiguous(4, 2)
    sizes = Sizes(d_model=4, expert_hidden=1, x_bytes=2, weight_bytes=4, index_bytes=8)
    step = count(token_A, plan.rank_of(token_A, expert_A), src_T, 2, 1, sizes)
    assert step.rank_rows.tolist() == [[2, 1], [1, 2]]  # t1 -> rank 1, t3 -> rank 0
    assert step.rank_assignments.tolist() == [[3, 1], [1, 3]]
    assert step.devices_per_token == 1.5 and step.devices_per_token_max == 2
    assert step.nodes_per_token == 1.5  # a node a rank
    # 2 remote rows of 4 x 2 bytes, 2 remote assignments of 4 + 8 bytes; combine: the rows
    assert (step.dispatch_bytes, step.combine_bytes) == (2 * 8 + 2 * 12, 2 * 8)
    assert step.bytes_per_token == 56 / 4
    assert step.straggler == 1.0 and step.compute_straggler == 1.0
    # rank 0 sends 8 + 12 bytes to rank 1 (another node) and receives as much
    assert step.dispatch_bytes_4P.tolist() == [[0, 0], [20, 20], [0, 0], [20, 20]]
    # 1 byte/us between nodes, 1 us latency, 1 FLOP/us: dispatch 21, combine 1 + 8, compute:
    # 4 assignments of 6 * 4 * 1 FLOPs on each rank
    machine = Machine(intra_gbps=1.0, inter_gbps=1e-3, latency_us=1.0, gemm_tflops=1e-6)
    estimate(step, sizes, machine, 1)
    assert (step.dispatch_us, step.combine_us, step.compute_us) == (21.0, 9.0, 96.0)
    assert step.step_us == 21 + 9 + 96
    machine = Machine(
        intra_gbps=1.0, inter_gbps=1e-3, latency_us=1.0, gemm_tflops=1e-6, overlap=True
    )
    assert estimate(step, sizes, machine, 1).step_us == 96.0


def test_one_node_keeps_every_byte_intra_node() -> None:
    token_A, expert_A, src_T = hand_case()
    step = simulate(token_A, expert_A, src_T, placement.contiguous(4, 2), 2, Sizes(4, 1), Machine())
    assert step.dispatch_bytes_4P[[1, 3]].sum() == 0 and step.nodes_per_token == 1.0


def random_scores(T: int, E: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((T, E)).astype(np.float32)


@pytest.mark.parametrize("P", [8, 32, 64])
def test_limited_rules_never_exceed_their_limit(P: int) -> None:
    E, K, rpn = 256, 4, 8
    sel = random_scores(200, E, P)
    home = placement.contiguous(E, P).home_E
    for M in (1, 2, 3):
        if M * (E // P) < K:
            continue
        picked = select(sel, Rule("device", M), home, K, rpn)
        ranks = {len(set(row)) for row in (picked // (E // P)).tolist()}
        assert max(ranks) <= M and min(ranks) >= 1
    for M in (1, 2, 4):
        picked = select(sel, Rule("node", M), home, K, rpn)
        assert max(len(set(row)) for row in (picked // (E // P * rpn)).tolist()) <= M
    topk = select(sel, Rule("topk"), home, K, rpn)
    assert (np.sort(topk, 1) == np.sort(np.argsort(-sel, 1)[:, :K], 1)).all()


def test_a_rule_that_cannot_route_names_why() -> None:
    with pytest.raises(ValueError, match=r"device-limited routing needs M \* E/P >= K"):
        select(random_scores(4, 16), Rule("device", 1), np.arange(16) // 2, 4, 8)
    with pytest.raises(ValueError, match=r"task\.rules holds 'device'; allowed"):
        Rule.parse("device")
    with pytest.raises(ValueError, match=r"task\.ranks holds 12; allowed: positive multiples"):
        EPSimConfig(ranks=[8, 12])
    with pytest.raises(ValueError, match=r"task\.placements holds 'random'; allowed"):
        EPSimConfig(placements=["random"])


def test_device_and_node_rules_equal_the_deepseek_routers() -> None:
    """At P = num_devices (groups), the simulator's rule picks the variants' own experts."""
    torch.manual_seed(0)
    x_TD = torch.randn(64, 16)
    v2 = variants.build("deepseek_v2", num_experts=16, top_k=4, d_model=16, expert_hidden=8,
                        num_devices=4, max_devices=2, capacity_factor=None).eval()  # fmt: skip
    v3 = variants.build("deepseek_v3", num_experts=16, top_k=4, d_model=16, expert_hidden=8,
                        num_groups=4, topk_groups=2).eval()  # fmt: skip
    v3.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 16))
    home = placement.contiguous(16, 4).home_E
    for layer, rule, rpn in ((v2, Rule("device", 2), 4), (v3, Rule("node", 2), 1)):
        with torch.no_grad():
            routing, _ = layer.router(x_TD, 1)
            scores_TE = layer.router.score(layer.router.logits(x_TD))
        sel_TE = scores_TE + getattr(layer.router, "expert_bias", torch.zeros(16))
        picked = select(sel_TE.numpy(), rule, home, 4, rpn)
        assert (np.sort(picked, 1) == np.sort(routing.expert.view(64, 4).numpy(), 1)).all()


def test_placements_hold_every_expert_and_fill_every_rank() -> None:
    assert placement.contiguous(8, 4).rank_R.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert placement.round_robin(8, 4).rank_R.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    load = np.array([10, 1, 1, 1])
    plan = placement.eplb(load, P=2, ranks_per_node=2, redundant_per_rank=1)
    # 2 spare slots go to expert 0 (load per copy 10 -> 5 -> 3.3); heaviest first onto the
    # least-loaded rank, a rank without a copy first
    assert plan.count_E.tolist() == [3, 1, 1, 1]
    assert plan.slots_per_rank.tolist() == [3, 3]
    assert sorted(plan.rank_R[:3].tolist()) == [0, 0, 1]
    # the hot expert's assignments go to its copies in turn
    ranks = plan.rank_of(np.arange(6), np.zeros(6, dtype=int))
    assert ranks.tolist() == plan.rank_R[[0, 1, 2, 0, 1, 2]].tolist()
    big = placement.eplb(np.arange(64), P=16, ranks_per_node=8, redundant_per_rank=2)
    assert (big.count_E >= 1).all() and (big.slots_per_rank == 4 + 2).all()
    # copies stay in the node of the expert's contiguous home (node-limited groups hold)
    assert ((big.rank_R // 8) == (np.repeat(np.arange(64), big.count_E) // 32)).all()


def test_eplb_lowers_the_straggler_of_a_skewed_load() -> None:
    rng = np.random.default_rng(0)
    E, P, K, T = 64, 8, 2, 4096
    popularity = 1.0 / np.arange(1, E + 1)  # Zipf: expert 0 hottest
    gumbel_TE = np.log(popularity) - np.log(-np.log(rng.random((T, E))))  # K draws, no repeat
    expert_TK = np.argsort(-gumbel_TE, 1)[:, :K]
    token_A, expert_A = np.repeat(np.arange(T), K), expert_TK.reshape(-1)
    src_T = np.arange(T) // (T // P)
    sizes, machine = Sizes(64, 64), Machine()
    base = simulate(token_A, expert_A, src_T, placement.contiguous(E, P), 8, sizes, machine)
    load = np.bincount(expert_A, minlength=E)
    plan = placement.eplb(load, P, 8, redundant_per_rank=1)
    balanced = simulate(token_A, expert_A, src_T, plan, 8, sizes, machine)
    assert base.compute_straggler > 1.5 and balanced.compute_straggler < 1.1


def recorded_trace(tmp_path, variant: str, **fields):
    cfg = LMConfig(d_model=16, n_layers=2, n_heads=2, seq_len=16)
    torch.manual_seed(0)
    layer = dict(num_experts=16, top_k=2, expert_hidden=8, d_model=16, **fields)
    lm = build_lm(variant, layer, cfg)
    meta = {"variant": variant, "num_experts": 16, "top_k": 2, "tokens_per_step": 64}
    recorder = TraceRecorder(lm, 2, [1], True, meta)
    opt = torch.optim.SGD(lm.parameters(), lr=1.0)  # a large step: stale weights would show
    for step in range(1, 5):
        idx_BS = torch.randint(0, 256, (4, 16))
        with recorder.capture(step):
            out = lm(idx_BS, idx_BS)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        lm.update_bias()  # as the convergence task does, after the step
        recorder.record(step, out, idx_BS, torch.tensor([0, 1, 1, 0]))
    recorder.save(tmp_path)
    return load_trace(tmp_path)


@pytest.mark.parametrize(
    ("variant", "fields"),
    [("deepseek_v3", {"num_groups": 1, "topk_groups": 1}), ("mixtral", {})],
)
def test_a_recorded_trace_replays_its_own_routing(tmp_path, variant, fields) -> None:
    trace = recorded_trace(tmp_path, variant, **fields)
    assert trace.steps == [2, 4] and trace.layers == [1] and trace.has_router
    for step in trace.steps:
        one = trace.routing_of(step, 1)
        assert one["domain_T"].tolist() == [0] * 16 + [1] * 32 + [0] * 16
        sel = selection_scores(trace, step, 1)
        picked = select(sel, Rule("topk"), np.arange(16) // 2, 2, 8)
        assert (np.sort(picked, 1) == np.sort(one["expert_A"].reshape(64, 2), 1)).all()
    with pytest.raises(ValueError, match=r"task.trace_layers holds 0; allowed: the MoE layers"):
        cfg = LMConfig(d_model=16, n_layers=2, n_heads=2, seq_len=16, moe_every=2)
        TraceRecorder(build_lm("mixtral", {"num_experts": 4, "d_model": 16}, cfg), 1, [0], True, {})


def test_replay_yields_every_rule_and_placement_on_the_same_tokens(tmp_path) -> None:
    trace = recorded_trace(tmp_path, "deepseek_v3", num_groups=1, topk_groups=1)
    rules = [Rule("topk"), Rule("device", 1), Rule("node", 1)]
    names = ["contiguous", "round_robin", "eplb"]
    found = list(replay(trace, Layout(8, 4, 16), rules, names, Sizes(16, 8), Machine()))
    skipped = [r for r in found if r.sim is None]  # device:1 at 2 experts a rank, top-2: ok
    assert not skipped and len(found) == 3 * 3 * 1  # steps after the first, one layer
    for r in found:
        assert r.sim.num_tokens == 8 * 16 and r.sim.rank_rows.sum(1).tolist() == [
            r.sim.rank_rows[i].sum() for i in range(8)
        ]
        if r.rule == "device:1" and r.placement != "eplb":
            assert r.sim.devices_per_token_max == 1
        if r.rule == "node:1":
            assert r.sim.nodes_per_token_max == 1
    topk = {r.placement: r.sim for r in found if r.rule == "topk"}
    # the same tokens and experts: EPLB moves rows between ranks, not assignments
    assert topk["eplb"].rank_assignments.sum() == topk["contiguous"].rank_assignments.sum()
