"""Shared fixtures and tiny fakes for the whole suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    # CI has 2 cores; keep runs comparable and avoid oversubscription.
    torch.set_num_threads(2)
