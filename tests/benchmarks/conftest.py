"""Fixtures of the benchmark suite (the cases themselves live in `moe_bench/bench/cases.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moe_bench.bench.cases import NUM_THREADS

from . import gated

HERE = Path(__file__).parent
# a smoke run of a fine-size case (E=64, K=8) takes seconds, a coarse one a few tenths, a
# quick one hundredths: `loop` and the HF-style fake step expert by expert. The default run
# smoke-runs the quick size (every backend and peer the benchmark times, through the same code
# as the larger sizes), the slow run the others; the benchmark run times every case.
SLOW_SMOKE_SIZES = ("fine", "coarse")


def is_smoke(config: pytest.Config) -> bool:
    """Benchmarks disabled (the default and slow runs): each case runs once, nothing timed."""
    disabled = config.getoption("benchmark_disable", False)
    return bool(disabled and not config.getoption("benchmark_enable", False))


def case_size(item: pytest.Item) -> str | None:
    """The benchmark size an item runs (its `size`, or its time rule's), else None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "rule" in params:
        return gated.TIME_RULES[params["rule"]].size
    return params.get("size")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not is_smoke(config):
        return
    for item in items:
        if item.path.is_relative_to(HERE) and case_size(item) in SLOW_SMOKE_SIZES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smoke(pytestconfig: pytest.Config) -> bool:
    """Benchmarks disabled (the default run): smoke-run the cases at SMOKE_TOKENS tokens."""
    return is_smoke(pytestconfig)


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
