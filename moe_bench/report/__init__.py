"""The HTML report of a sweep (`python -m moe_bench.report SWEEP_DIR`).

Reads result files only (never the tasks): see `build.build_report`.
"""

from .build import build_report

__all__ = ["build_report"]
