"""The HTML report of a sweep (`python -m moe_bench.report SWEEP_DIR`), in stages:
`load` (rows, jobs, run card) -> `frames` (arms, spreads, config identity) -> `stats` (the one
significance rule) -> `leaderboards` -> `claims` -> `figures` -> `render`; `compare` sets
sweeps side by side. Reads result files only: no torch, no variant or task code.
"""

from .render import build_report

__all__ = ["build_report"]
