"""Expert parallelism on gloo processes: EP equals the single-process layer, counts are exact.

Each spawned rank builds the same layer (same seed) and the same global batch, computes the
single-process reference on ALL tokens itself, runs ExpertParallel on its own block of
sequences, and checks its slice of the output and of every gradient; the traffic matrix is
checked against a hand count of the reference routing. One spawn runs many cases (a spawn
costs seconds on 2 cores; a case costs milliseconds).

Shape legend: P ranks, B sequences per rank, S sequence length, D model width, E experts.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import variants
from moe_bench.launch import RankFailed, init_from_env, spawn_ranks
from variants.mixtral import MixtralConfig, MixtralRouter
from variants.parallel.expert_parallel import EPPlan, ExpertParallel, _check_groups

B, S, D, H = 2, 4, 8, 6
TOL = 1e-5

# every dropless token-choice variant (capacity_factor=None where the paper has one)
DROPLESS: dict[str, dict] = {
    "mixtral": dict(num_experts=4, top_k=2, activation="swiglu"),
    "deepseek_moe": dict(num_experts=8, top_k=3, num_shared_experts=1),
    "deepseek_v3": dict(
        num_experts=8, top_k=4, num_shared_experts=1, num_groups=4, topk_groups=2
    ),
    "noisy_topk": dict(num_experts=8, top_k=2),  # eval: noise off
    "switch": dict(num_experts=8, capacity_factor=None),
    "gshard": dict(num_experts=8, capacity_factor=None),
    "deepseek_v2": dict(
        num_experts=8, top_k=3, num_shared_experts=1, num_devices=4, max_devices=2,
        capacity_factor=None,
    ),
    # released models' blocks: the shared expert's sigmoid gate (Qwen3-Next), experts with
    # biases and the clamped SwiGLU (gpt-oss), the weight on the expert's input (Llama 4)
    "qwen3_next": dict(num_experts=8, top_k=3, num_shared_experts=1, shared_hidden=12),
    "gpt_oss": dict(num_experts=8, top_k=2),
    "llama4": dict(num_experts=8, top_k=2, num_shared_experts=1),
    # routes by token id: the wrapper forwards `token_ids` to the router
    "hash": dict(num_experts=8, top_k=2, num_shared_experts=1, vocab_size=16),
    "deepseek_v4": dict(num_experts=8, top_k=2, num_shared_experts=1),
}  # fmt: skip
BACKENDS = ("grouped", "loop")


def _batch(P: int) -> torch.Tensor:
    return torch.randn(P * B, S, D, generator=torch.Generator().manual_seed(1))


def _ids(P: int) -> torch.Tensor:
    """Token ids of the batch (every layer takes them; hash routing reads them)."""
    return torch.randint(0, 16, (P * B, S), generator=torch.Generator().manual_seed(3))


def _close(name: str, got: torch.Tensor | None, want: torch.Tensor | None) -> None:
    """Equal to TOL; a missing gradient counts as zeros (noisy_topk's noise weight in eval)."""
    if got is None and want is None:
        return
    got = torch.zeros_like(want) if got is None and want is not None else got
    want = torch.zeros_like(got) if want is None and got is not None else want
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL}"


def _hand_count(routing, P: int, E: int, T_rank: int) -> dict:
    """Traffic of the reference routing split into P blocks of T_rank tokens, counted by hand."""
    L = E // P
    rows = [[0] * P for _ in range(P)]
    assign = [[0] * P for _ in range(P)]
    ranks_of: dict[int, set] = {}
    for t, e in zip(routing.token.tolist(), routing.expert.tolist()):
        src, dst = t // T_rank, e // L
        assign[src][dst] += 1
        ranks_of.setdefault(t, set()).add(dst)
    for t, dsts in ranks_of.items():
        for dst in dsts:
            rows[t // T_rank][dst] += 1
    kept = sum(map(sum, assign))
    remote = kept - sum(assign[r][r] for r in range(P))
    received = [sum(rows[s][d] for s in range(P)) for d in range(P)]
    return dict(
        rows=rows,
        assign=assign,
        remote_fraction=remote / kept,
        devices_per_token=sum(len(v) for v in ranks_of.values()) / (P * T_rank),
        devices_per_token_max=max(len(v) for v in ranks_of.values()),
        rank_imbalance=max(received) / (sum(received) / P),
    )


def _check_case(rank: int, P: int, name: str, fields: dict, backend: str, train: bool) -> None:
    torch.manual_seed(0)
    layer = variants.build(name, d_model=D, expert_hidden=H, backend=backend, **fields)
    layer.train(train)
    ref = copy.deepcopy(layer)
    x_all, ids_all = _batch(P), _ids(P)
    g_all = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(2))
    mine = slice(rank * B, (rank + 1) * B)

    x_ref = x_all.clone().requires_grad_()
    out_ref = ref(x_ref, token_ids=ids_all)
    (out_ref.y * g_all).sum().backward()

    ep = ExpertParallel(layer)
    del layer  # this rank keeps only its experts (the router and shared experts are shared)
    x = x_all[mine].clone().requires_grad_()
    out = ep(x, token_ids=ids_all[mine])
    (out.y * g_all[mine]).sum().backward()
    ep.sync_replicated_grads(average=False)  # sum over ranks = the single-process gradient

    case = f"rank {rank}/{P} {name} {backend} {'train' if train else 'eval'}"
    _close(f"{case} y", out.y, out_ref.y[mine])
    _close(f"{case} grad x", x.grad, x_ref.grad[mine])
    for n, p in ep.router.named_parameters():
        _close(f"{case} grad router.{n}", p.grad, dict(ref.router.named_parameters())[n].grad)
    lo, hi = ep.plan.first, ep.plan.first + ep.plan.per_rank
    for n, p in ep.experts.named_parameters():
        _close(f"{case} grad experts.{n}", p.grad, getattr(ref.experts, n).grad[lo:hi])
    if ep.shared is not None:
        for n, p in ep.shared.named_parameters():
            _close(f"{case} grad shared.{n}", p.grad, getattr(ref.shared, n).grad)
    if ep.shared_gate is not None:
        _close(f"{case} grad shared_gate", ep.shared_gate.weight.grad, ref.shared_gate.weight.grad)

    want = _hand_count(out_ref.routing, P, ep.cfg.num_experts, B * S)
    st = ep.stats
    assert st.rank_tokens.tolist() == want["rows"], case
    assert st.rank_assignments.tolist() == want["assign"], case
    assert st.num_tokens == P * B * S, case
    for key in ("remote_fraction", "devices_per_token", "rank_imbalance"):
        assert getattr(st, key) == pytest.approx(want[key]), f"{case} {key}"
    assert st.devices_per_token_max == want["devices_per_token_max"], case
    remote_rows = sum(want["rows"][s][d] for s in range(P) for d in range(P) if s != d)
    remote_assign = sum(want["assign"][s][d] for s in range(P) for d in range(P) if s != d)
    assert st.combine_bytes == remote_rows * D * 4, case
    assert st.dispatch_bytes == remote_rows * D * 4 + remote_assign * (4 + 8), case
    assert min(st.route_ms, st.dispatch_ms, st.expert_ms, st.combine_ms) >= 0, case
    if name == "deepseek_v2" and ep.cfg.num_devices % P == 0:  # a rank holds whole devices
        assert st.devices_per_token_max <= min(ep.cfg.max_devices, P), case

    if train and hasattr(ep.router, "load_count"):  # V3: bias from the load of all ranks
        ep.update_bias()
        ref.update_bias()
        _close(f"{case} expert_bias", ep.router.expert_bias, ref.router.expert_bias)


def _parity_worker(rank: int, P: int, cases: list[tuple]) -> int:
    for case in cases:
        _check_case(rank, P, *case)
    return len(cases)


def _capacity_worker(rank: int, P: int) -> dict[str, dict]:
    """Capacity is per rank: EP equals the single-process layer run on this rank's tokens, not
    the single-process layer run on every rank's tokens (whose capacity counts them all).
    Returns, per variant, the assignments this rank dropped and the largest differences of its
    output from both references."""
    found = {}
    for name, fields in (
        ("switch", dict(num_experts=4, capacity_factor=1.0)),
        ("gshard", dict(num_experts=4, capacity_factor=0.5)),
    ):
        torch.manual_seed(0)
        layer = variants.build(name, d_model=D, expert_hidden=H, **fields).eval()
        ref = copy.deepcopy(layer)
        x_all = _batch(P)
        x = x_all[rank * B : (rank + 1) * B]
        out, out_ref = ExpertParallel(layer)(x), ref(x)
        y_global = ref(x_all).y[rank * B : (rank + 1) * B]
        found[name] = dict(
            dropped=int(out.routing.demand.sum() - out.routing.load.sum()),
            err_local=float((out.y - out_ref.y).abs().max()),
            err_global=float((out.y - y_global).abs().max()),
        )
    return found


def _empty_rank_worker(rank: int, P: int, backend: str) -> list[int]:
    """Every token's experts live on rank 0, so rank 1 receives nothing: still exact."""
    T = P * B * S
    torch.manual_seed(0)
    layer = variants.build("mixtral", d_model=T, num_experts=4, expert_hidden=H, backend=backend)
    with torch.no_grad():  # logits 3, 2 on experts 0, 1 (rank 0), 0 and -1 on rank 1's
        layer.router.weight.copy_(torch.tensor([3.0, 2.0, 0.0, -1.0])[:, None].expand(4, T))
    ref = copy.deepcopy(layer)
    x_all = torch.eye(T).view(P * B, S, T)
    mine = slice(rank * B, (rank + 1) * B)
    x_ref = x_all.clone().requires_grad_()
    out_ref = ref(x_ref)
    out_ref.y.square().sum().backward()
    ep = ExpertParallel(layer)
    x = x_all[mine].clone().requires_grad_()
    out = ep(x)
    out.y.square().sum().backward()
    ep.sync_replicated_grads(average=False)
    _close("y", out.y, out_ref.y[mine])
    _close("grad x", x.grad, x_ref.grad[mine])
    _close("grad router", ep.router.weight.grad, ref.router.weight.grad)
    lo = ep.plan.first
    _close("grad w1", ep.experts.w1.grad, ref.experts.w1.grad[lo : lo + 2])
    return ep.stats.received_tokens.tolist()


def _failing_worker(rank: int, P: int) -> None:
    torch.manual_seed(0)
    ep = ExpertParallel(variants.build("mixtral", d_model=D, num_experts=4, expert_hidden=H))
    if rank == P - 1:
        raise ValueError("rank broke on purpose before the exchange")
    ep(_batch(P)[rank * B : (rank + 1) * B])  # the others wait in the count exchange


def _silent_worker(rank: int, P: int) -> None:
    """The last rank never joins the exchange (alive, busy): the others' collective times out."""
    torch.manual_seed(0)
    ep = ExpertParallel(variants.build("mixtral", d_model=D, num_experts=4, expert_hidden=H))
    if rank == P - 1:
        time.sleep(60)
    ep(_batch(P)[rank * B : (rank + 1) * B])


def _cases(train_v3: bool) -> list[tuple]:
    cases = [(n, f, b, False) for n, f in DROPLESS.items() for b in BACKENDS]
    # SparseMixer's selection (router_grad=sparsemixer) happens before dispatch; in eval it is
    # deterministic, so each rank's routing equals the reference's (training samples per rank)
    sparsemixer = dict(DROPLESS["mixtral"], router_grad="sparsemixer", jitter_eps=0.3)
    cases += [("mixtral", sparsemixer, b, False) for b in BACKENDS]
    if train_v3:  # training mode: local sequence losses, bias update from all ranks' load
        cases.append(("deepseek_v3", DROPLESS["deepseek_v3"], "grouped", True))
        cases.append(("deepseek_v2", DROPLESS["deepseek_v2"], "loop", True))
    return cases


def _two_rank_suite(rank: int, P: int, cases: list[tuple]) -> dict:
    """Every 2-rank check in one spawn (starting ranks costs seconds, a check milliseconds)."""
    _parity_worker(rank, P, cases)
    capacity = _capacity_worker(rank, P)
    received = {b: _empty_rank_worker(rank, P, b) for b in BACKENDS}
    return dict(cases=len(cases), capacity=capacity, received=received)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return spawn_ranks(_two_rank_suite, 2, args=(_cases(train_v3=True),), timeout_s=120)


@pytest.mark.slow  # two spawned ranks: the slow run
def test_two_ranks_equal_single_process(two_ranks: list[dict]) -> None:
    assert [r["cases"] for r in two_ranks] == [len(_cases(train_v3=True))] * 2


@pytest.mark.slow  # two spawned ranks: the slow run
def test_capacity_is_per_rank(two_ranks: list[dict]) -> None:
    for name in ("switch", "gshard"):
        per_rank = [r["capacity"][name] for r in two_ranks]
        assert all(c["dropped"] > 0 for c in per_rank), f"{name}: no drop tested"
        assert all(c["err_local"] <= TOL for c in per_rank), f"{name}: {per_rank}"
        # a capacity counted over all ranks' tokens would drop other assignments
        assert max(c["err_global"] for c in per_rank) > 1e-3, f"{name}: {per_rank}"


@pytest.mark.slow  # two spawned ranks: the slow run
def test_rank_receiving_nothing(two_ranks: list[dict]) -> None:
    for backend in BACKENDS:
        assert [r["received"][backend] for r in two_ranks] == [[2 * B * S, 0]] * 2


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_four_ranks_equal_single_process() -> None:
    cases = _cases(train_v3=True)
    assert spawn_ranks(_parity_worker, 4, args=(cases,), timeout_s=180) == [len(cases)] * 4


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_failing_rank_ends_job_with_its_error() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank broke on purpose"):
        spawn_ranks(_failing_worker, 2, timeout_s=60)
    assert time.monotonic() - start < 60


def test_refuses_what_it_cannot_shard() -> None:
    ec = variants.build("expert_choice", d_model=D, num_experts=4, expert_hidden=H)
    with pytest.raises(ValueError, match="not token-choice"):
        ExpertParallel(ec)
    with pytest.raises(ValueError, match="no routed experts"):
        ExpertParallel(variants.build("dense", d_model=D))
    for name in ("moe_plus_plus", "longcat_flash"):  # their zero-computation experts
        pool = variants.build(name, d_model=D, num_experts=4, top_k=2, expert_hidden=H)
        with pytest.raises(ValueError, match="has a forward of its own"):
            ExpertParallel(pool)
    with pytest.raises(ValueError, match="num_experts=6 must be divisible by world_size=4"):
        EPPlan(num_experts=6, world_size=4, rank=0, backend="grouped")
    with pytest.raises(ValueError, match="backend='padded' is not one of"):
        EPPlan(num_experts=8, world_size=4, rank=0, backend="padded")
    v2 = variants.make_config("deepseek_v2", num_experts=12, num_devices=3, max_devices=2)
    with pytest.raises(ValueError, match="num_devices=3 must divide or be a multiple"):
        _check_groups(v2, 4)
    with pytest.raises(ValueError, match="world_size=0"):
        spawn_ranks(_failing_worker, 0)


def test_refusal_reads_what_the_config_says_not_the_router() -> None:
    """A token-choice router under a config that says `token_choice = False` is refused: the
    layer's config, not its router's class, says what it is."""
    not_token_choice = type("NotTokenChoice", (MixtralConfig,), {"token_choice": False})
    cfg = not_token_choice(d_model=D, num_experts=4, expert_hidden=H)
    with pytest.raises(ValueError, match="NotTokenChoice is not token-choice"):
        ExpertParallel(variants.MoELayer(cfg, MixtralRouter(cfg)))
    assert [n for n in variants.names() if not variants.lookup(n).config.token_choice] == [
        "expert_choice"
    ]


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_collective_times_out_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"(?is)rank 0 failed.*timed out"):
        spawn_ranks(_silent_worker, 2, timeout_s=50, collective_timeout_s=2)
    assert time.monotonic() - start < 50


def test_init_from_env_needs_the_launcher_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "SLURM_PROCID", "WORLD_SIZE", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"RANK \(or SLURM_PROCID\) is not set"):
        init_from_env("gloo")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        init_from_env("gloo")


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_init_from_env_joins_slurm_style_ranks() -> None:
    """A one-rank job started the way Slurm starts one (SLURM_* and MASTER_* only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = (
        "import torch.distributed as dist; from moe_bench.launch import init_from_env; "
        "print(init_from_env('gloo', timeout_s=20), dist.get_world_size())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[2],  # the repository root: its `moe_bench`
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(0,", "1)", "1"]
