"""Shared fixtures and tiny fakes for the whole suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    # Unit tests run small ops, where a second thread costs more than it gives (and makes a
    # busy machine's timings erratic). Benchmarks set their own thread count.
    torch.set_num_threads(1)
