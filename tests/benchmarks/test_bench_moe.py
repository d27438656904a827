"""Forward+backward speed of MoE layers: variant x backend x size, against the dense reference.

Normal test runs (`--benchmark-disable`) run each case once as a smoke test. The benchmark run
(`--benchmark-enable --benchmark-only --benchmark-json FILE`) times them and
`python -m moe_bench.bench.benchgate FILE` gates on ratios within that one run: `test_gated_ratio`
times the two layers of each time rule interleaved (the ratios the gate reads), `test_fwd_bwd`
times every case on its own (the table people read, and peak memory).
"""

from __future__ import annotations

import pytest
import torch

from moe_bench.bench import hf_peer
from moe_bench.bench.cases import (
    CASES,
    HF_PEER,
    WARMUP_ROUNDS,
    Case,
    build_layer,
    make_inputs,
    moe_config,
    shape,
    step_peak_bytes,
    training_step,
)
from moe_bench.isocompute import BACKWARD_FACTOR, ffn_flops_per_token
from moe_bench.metrics import load_entropy

from . import gated

# the gated ratios' own cases get more rounds; slow baselines (seconds per step) fewer
ROUNDS = {"dense": 5, "grouped": 5}
OTHER_ROUNDS = 3


@pytest.mark.parametrize("rule", list(gated.TIME_RULES))
def test_gated_ratio(benchmark, bench_threads: int, smoke: bool, rule: str) -> None:
    """The rule's two layers timed interleaved (A B, B A, ...), so a load or clock change mid-run
    hits both alike, in a process of its own (`tests/benchmarks/gated.py` says why); the gate
    reads the median per-round ratio and shows its confidence interval and the fastest-rounds
    ratio (moe_bench/bench/benchgate.py says why). The default test run smoke-runs it here."""
    gate_rule = gated.TIME_RULES[rule]
    if HF_PEER in (gate_rule.numerator, gate_rule.denominator) and (reason := hf_peer.available()):
        pytest.skip(reason)
    benchmark.group = "gated ratios"
    info = benchmark.pedantic(
        lambda: gated.measure(rule, smoke=True) if smoke else gated.in_fresh_process(rule),
        rounds=1,
        iterations=1,
    )
    assert info["rule"] == rule and info["rounds"] >= (
        1 if smoke else gated.TIME_RULES[rule].rounds[0]
    )
    assert all(r > 0 for r in info["ratios"]) and info["num_threads"] == bench_threads
    benchmark.extra_info.update(info)


@pytest.mark.parametrize(
    ("size", "variant", "backend"),
    [(c.size, c.variant, c.backend) for c in CASES],
    ids=[c.id for c in CASES],
)
def test_fwd_bwd(
    benchmark,
    bench_threads: int,
    dense_seconds: dict[str, float],
    smoke: bool,
    size: str,
    variant: str,
    backend: str,
) -> None:
    case = Case(size, variant, backend)
    if (variant, backend) == HF_PEER and (reason := hf_peer.available()):
        pytest.skip(reason)
    layer = build_layer(case)
    x_TD, grad_TD = make_inputs(size, smoke)
    num_tokens = shape(size, smoke)[0]
    benchmark.group = size
    out = benchmark.pedantic(
        training_step(layer, x_TD, grad_TD),
        rounds=ROUNDS.get(backend, OTHER_ROUNDS),
        warmup_rounds=WARMUP_ROUNDS,
    )
    assert out.y.shape == x_TD.shape and torch.isfinite(out.y).all()
    # the peer has no config of ours: it computes what the size's deepseek_moe layer computes
    cfg = moe_config(size) if (variant, backend) == HF_PEER else layer.cfg
    info = {
        "size": size,
        "variant": variant,
        "backend": backend,
        "num_threads": bench_threads,
        "active_flops": (1 + BACKWARD_FACTOR) * num_tokens * ffn_flops_per_token(cfg),
        "load_entropy": load_entropy(out.routing.load) if out.routing is not None else None,
        # which expert-compute path the layer's backend ran (grouped: per_expert, padded_bmm)
        "dispatch_path": getattr(out, "dispatch_path", None),
    }
    if benchmark.stats is not None:  # the memory pass belongs to the benchmark run only
        info["peak_memory_bytes"] = step_peak_bytes(layer, x_TD, grad_TD)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.min
        if variant == "dense":
            dense_seconds[size] = seconds
        info["tokens_per_s"] = num_tokens / seconds
        if size in dense_seconds:
            info["ratio_to_dense"] = seconds / dense_seconds[size]
    benchmark.extra_info.update(info)
