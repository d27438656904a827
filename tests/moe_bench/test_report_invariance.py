"""The report's Invariance table and the invariance task's pieces that need no torch run."""

from __future__ import annotations

import pandas as pd
from omegaconf import OmegaConf

import variants
from moe_bench.paths import config_dir
from moe_bench.report.invariance import invariance_table, tolerances
from moe_bench.tasks.invariance import summary


def _row(case: str, split: str, quantity: str, value: float, expect: str, passed: bool) -> dict:
    return dict(
        metric="invariance_diff", case=case, split=split, quantity=quantity, value=value,
        tolerance=1e-5, expect=expect, passed=passed,
    )  # fmt: skip


ROWS = [
    _row("mixtral · global_batch", "micro4", "aux_loss", 2e-7, "equal", True),
    _row("mixtral · global_batch", "micro4", "aux_grad", 3e-7, "equal", True),
    _row("mixtral · micro_batch", "micro4", "aux_loss", 4e-3, "differs", True),
    _row("mixtral · micro_batch", "micro4", "aux_grad", 9e-2, "differs", True),
    _row("mixtral · micro_batch", "micro4", "routing", 0.0, "equal", True),
    _row("deepseek_v3", "ep2", "counts", 0.5, "equal", False),
    _row("deepseek_v3", "ep2", "update", 0.0, "equal", True),
]


def test_every_case_by_split_with_its_difference_and_verdict() -> None:
    table = invariance_table(pd.DataFrame(ROWS)).set_index("case")
    assert list(table.columns) == ["micro4", "ep2"]  # the suite's split order
    assert table.loc["mixtral · global_batch", "micro4"] == "equal 3.0e-07 · pass"
    # the smallest of the differences expected, the largest of those expected equal
    assert table.loc["mixtral · micro_batch", "micro4"] == "differs 4.0e-03 · equal 0.0e+00 · pass"
    assert table.loc["deepseek_v3", "ep2"] == "equal 5.0e-01 · FAIL: counts"
    assert table.loc["deepseek_v3", "micro4"] == "—"
    assert tolerances(pd.DataFrame(ROWS)) == {"ep2": 1e-5, "micro4": 1e-5}


def test_no_invariance_rows_no_table() -> None:
    assert invariance_table(pd.DataFrame([dict(metric="fwd_ms", value=1.0)])).empty


def test_summary_names_the_first_failure() -> None:
    assert summary(ROWS) == "6/7 checks pass; first: deepseek_v3 ep2 counts"
    assert summary([]) == "no loss or step state: nothing to check"


def test_the_preset_sweeps_every_registered_variant() -> None:
    preset = OmegaConf.load(config_dir() / "experiment" / "invariance.yaml")
    listed = preset.hydra.sweeper.params.variant.split(",")
    assert listed == variants.names()
