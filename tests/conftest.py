"""Shared fixtures and tiny fakes for the whole suite."""

from __future__ import annotations

import gc
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# torch is imported by the fixtures, not here: pytest-xdist's controlling process loads this
# file but runs no test, and importing torch there costs seconds of CPU that the two workers,
# starting at the same time on 2 cores, wait for

RAM_DISK = Path("/dev/shm")

# Collection imports torch, pandas and Hydra and rewrites every test module's asserts: hundreds of
# thousands of long-lived objects, across which each automatic full garbage collection walks the
# whole heap again (`pytest --collect-only -n 0` on the 2-core dev VM, idle: 6.0 s with it,
# 4.8 s without; the default run went from 55 s to 47-50 s). Nothing made while collecting needs
# the collector, so it is off until collection ends (and then the heap is frozen, below).
gc.disable()


@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin reads the option
def pytest_configure(config: pytest.Config) -> None:
    """Test files go to a RAM disk where there is one (Linux), in a folder of this run's own,
    removed when the run ends. pytest's default keeps the last three runs' folders on disk and
    deletes an older one as each run ends: on a disk mounted with `discard` (this project's VMs)
    deleting one run's files took seconds, all of them after the last test."""
    if config.option.basetemp or hasattr(config, "workerinput"):
        return  # given on the command line, or an xdist worker under its controller's folder
    if RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK):
        config.option.basetemp = str(RAM_DISK / f"moe-bench-pytest-{os.getpid()}")
        config._moe_bench_basetemp = config.option.basetemp


def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.pluginmanager.has_plugin("dsession"):
        # pytest-xdist's controlling process collects nothing: its collector comes back on here
        gc.freeze()
        gc.enable()


def pytest_collection_finish(session: pytest.Session) -> None:
    """After collection, torch, pandas, Hydra and the test modules are imported: hundreds of
    thousands of objects that live to the end. Frozen, they are left out of every later garbage
    collection, each of whose full passes would otherwise walk them all."""
    gc.freeze()
    gc.enable()


MODULES_FROZEN = pytest.StashKey[int]()  # len(sys.modules) when the heap was last frozen


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    """Modules a test imports on first use (matplotlib, transformers, torch._dynamo) are
    long-lived objects that the freeze after collection did not cover, so every later full
    collection would walk them again: after that test's teardown the heap is frozen once more.
    This also freezes whatever garbage is waiting at that moment, a few dozen times per run,
    which then stays in memory until the worker exits."""
    result = yield
    stash = item.config.stash
    if stash.get(MODULES_FROZEN, 0) != len(sys.modules):
        stash[MODULES_FROZEN] = len(sys.modules)
        gc.freeze()
    return result


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    own = getattr(config, "_moe_bench_basetemp", None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)
    # the interpreter's exit collects every object the tests left, which takes an xdist worker
    # seconds that the controller waits for; frozen, they are simply freed with the process
    gc.freeze()


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
