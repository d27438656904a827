"""The report's Invariance section: every case (variant, or variant · balance scope) x split of
the invariance suite (`task=invariance` rows, metric `invariance_diff`) with its largest
difference from one forward and pass/fail. Torch-free: it reads rows only.

A cell, over the split's quantities (routing, aux_loss, aux_grad, counts, update): per
expectation, the largest relative difference of those expected `equal` (or `stated`: a bf16
router's flipped decisions and what follows from them) and the smallest of those expected to
differ (`differs`: a loss counted per forward); then `pass` when every quantity met its
expectation, else `FAIL` with the quantities that did not.
"""

from __future__ import annotations

import pandas as pd

from moe_bench import schema

SPLIT_ORDER = (
    "micro4", "micro4_running", "checkpoint", "micro4_checkpoint", "router_bf16", "ep2",
    "ep4", "dp2",
)  # fmt: skip


def _cell(part: pd.DataFrame) -> str:
    """'equal 2.9e-07 · differs 7.2e-01 · pass': per expectation, the largest difference of the
    quantities expected equal or stated, the smallest of those expected to differ."""
    passed = part["passed"].astype(bool)
    texts = []
    for expect, rows in part.groupby("expect", sort=False):
        value = rows["value"].min() if expect == "differs" else rows["value"].max()
        texts.append(f"{expect} {value:.1e}")
    verdict = "pass" if passed.all() else "FAIL: " + ", ".join(part.loc[~passed, "quantity"])
    return " · ".join([*sorted(texts), verdict])


def invariance_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per case, one column per split that ran (`—` where it does not apply)."""
    rows = frame[frame["metric"] == schema.INVARIANCE_DIFF.name] if "metric" in frame else frame
    if rows.empty or "split" not in rows:
        return pd.DataFrame()
    cells = {(case, split): _cell(part) for (case, split), part in rows.groupby(["case", "split"])}
    splits = [s for s in SPLIT_ORDER if s in set(rows["split"])]
    splits += sorted(set(rows["split"]) - set(splits))
    cases = sorted(set(rows["case"]))
    table = pd.DataFrame(
        [[cells.get((c, s), "—") for s in splits] for c in cases], index=cases, columns=splits
    )
    table.index.name = "case"
    return table.reset_index()


def tolerances(frame: pd.DataFrame) -> dict[str, float]:
    """The tolerance of each split, as its rows state it."""
    rows = frame[frame["metric"] == schema.INVARIANCE_DIFF.name] if "metric" in frame else frame
    if rows.empty or "split" not in rows:
        return {}
    return {s: float(t) for s, t in rows.groupby("split")["tolerance"].first().items()}
