"""Fixtures for the runner tests: Hydra's compose API over sweeps/, and a subprocess CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

import moe_bench

SWEEPS = moe_bench.SWEEPS
# tiny sizes on one thread (tiny ops gain nothing from two, and spin-waiting threads on a
# busy CI machine cost seconds): every test job runs in well under a second of compute
FAST = ["model=tiny", "device=cpu", "device.threads=1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """A job sets torch's thread count (device.threads) for the process; give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg(*overrides, hydra=False) -> the composed config, as the CLI would build it."""
    return moe_bench.compose


ROOT = SWEEPS.parent


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: one thread, and this checkout's packages first (an
    editable install may point at another checkout, and the subprocess runs in a temp dir)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def run_cli(
    args: list[str], cwd: Path, prelude: str = "", timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m moe_bench ARGS` in a fresh process; `prelude` runs first (to patch a task)."""
    code = (
        f"import runpy, sys\n{prelude}\n"
        f"sys.argv = ['moe_bench', *{args!r}]\n"
        "runpy.run_module('moe_bench', run_name='__main__', alter_sys=True)\n"
    )
    env = {**cli_env(), "HYDRA_FULL_ERROR": ""}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def sketch_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Report pages built under `monkeypatch` draw every figure (its data, its `Missing`, its
    matplotlib figure) but do not lay it out and save it as SVG: layout and SVG are most of a
    page's build time."""
    from matplotlib import pyplot as plt

    from moe_bench.report import figures
    from moe_bench.report.figures import draw

    def sketch(make: Callable[[], draw.Drawn], prefix: str) -> tuple[str, object]:
        with plt.rc_context(draw.STYLE):
            drawn = make()
        plt.close(drawn.figure)
        return f'<svg class="sketch" data-figure="{prefix}"></svg>', drawn.data

    monkeypatch.setattr(figures, "render_svg", sketch)


@pytest.fixture
def sketched_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build report pages with every figure drawn but not laid out and saved as SVG
    (`sketch_figures`). For tests that read a page's text and which figures it holds. The real
    SVG is checked by test_report.py's pages with real figures (a throughput sweep's in the
    default run; the full sweep's, every figure, self-contained and opened in a browser, in
    the slow run) and the figure tests, which draw every figure."""
    sketch_figures(monkeypatch)


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build report pages without their figures stage (no figure is drawn, none is listed as
    missing): for tests that read the page's other sections (jobs, leaderboards, notes, run
    card, claims), half of whose build time the figures would cost. Which figures a page holds
    is checked with `sketched_figures` or the real SVG."""
    from moe_bench.report import render

    monkeypatch.setattr(render, "_figures", lambda inputs, found: ([], []))
