"""The wheel: the sweep configs ship inside the package, every module ships, the console script.

Installing the wheel and running a job from it is scripts/wheel_check.sh (run by CI); this
builds the wheel only and reads its file list.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import moe_bench

ROOT = Path(__file__).resolve().parents[2]
# what the build reads: the project files and the folders that become packages
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "variants", "moe_bench", "sweeps")


def test_the_clone_reads_its_configs_from_sweeps_at_the_root() -> None:
    assert moe_bench.config_dir() == ROOT / "sweeps" == moe_bench.SWEEPS


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """A wheel built from a copy of the clone (the build's folders stay out of the clone); no
    build isolation, so no index is needed."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-w", str(out), str(src)], check=True, timeout=300)
    (path,) = out.glob("moe_bench-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


@pytest.mark.slow
def test_the_wheel_carries_every_sweep_config_inside_the_package(wheel: zipfile.ZipFile) -> None:
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sweeps").rglob("*.yaml"))
    assert "sweeps/config.yaml" in configs and "sweeps/variant/ep/switch.yaml" in configs
    names = wheel.namelist()
    missing = [path for path in configs if f"moe_bench/{path}" not in names]
    assert not missing, f"sweep configs missing from moe_bench/ in the wheel: {missing}"
    assert not [name for name in names if name.startswith("sweeps/")]  # no top-level package


@pytest.mark.slow
def test_the_wheel_carries_every_module_and_template(wheel: zipfile.ZipFile) -> None:
    sources = {
        p.relative_to(ROOT).as_posix()
        for package in ("variants", "moe_bench")
        for p in (ROOT / package).rglob("*")
        if p.suffix in (".py", ".j2", ".css") and "__pycache__" not in p.parts
    }
    assert {"moe_bench/bench/cases.py", "moe_bench/report/templates/report.html.j2"} <= sources
    missing = sorted(sources - set(wheel.namelist()))
    assert not missing, f"missing from the wheel: {missing}"


@pytest.mark.slow
def test_the_wheel_declares_the_moe_bench_console_script(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    lines = wheel.read(entry_points).decode().splitlines()
    assert "[console_scripts]" in lines
    assert "moe-bench = moe_bench.__main__:main" in lines
