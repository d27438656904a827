"""Fixtures of the benchmark suite (the cases themselves live in `moe_bench/bench/cases.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moe_bench.bench.cases import NUM_THREADS


@pytest.fixture(scope="session")
def smoke(pytestconfig: pytest.Config) -> bool:
    """Benchmarks disabled (the default run): smoke-run the cases at SMOKE_TOKENS tokens."""
    disabled = pytestconfig.getoption("benchmark_disable", False)
    return bool(disabled and not pytestconfig.getoption("benchmark_enable", False))


@pytest.fixture
def bench_threads(smoke: bool) -> Iterator[int]:
    """Timed cases run with the CI machine's 2 threads; smoke runs (nothing timed) with 1, like
    the unit tests: beside another xdist worker, two threads per worker on 2 cores spin-wait
    for each other (a fine loop step took 8x the CPU time of one thread). Restored after."""
    threads = 1 if smoke else NUM_THREADS
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dense_seconds() -> dict[str, float]:
    """size -> best fwd+bwd seconds of that size's dense reference, filled as dense cases run."""
    return {}
