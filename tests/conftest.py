"""Shared fixtures and tiny fakes for the whole suite."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

# torch is imported by the fixtures, not here: pytest-xdist's controlling process loads this
# file but runs no test, and importing torch there costs seconds of CPU that the two workers,
# starting at the same time on 2 cores, wait for


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    # Unit tests run small ops, where a second thread costs more than it gives (and makes a
    # busy machine's timings erratic). Benchmarks set their own thread count.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    """Close the figures a test drew and left open: pyplot keeps every open figure alive, and a
    worker's heap of old figures makes every later garbage collection slower."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")
