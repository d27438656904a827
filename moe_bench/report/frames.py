"""Frames: the tidy rows (docs/contract.md §5) read as arms, summary rows and spreads.

The one home of the report's config identity: `job_arms` groups jobs into arms with
`moe_bench.identity.arm_key` (a job's config minus its seed and run-only keys; the same key
resume compares, less the seed) and labels each arm (`identity.arm_labels`). Arms are taken per
run (`runs`): a job folder, or each config of a job that wrote rows of several into one folder
(the race: one run per raced variant, one for its dense reference). The leaderboards, figures,
claims and compare all key their rows by the `run` and `arm` columns `with_arms` adds. Also here:
selecting rows (summary rows over layers, routed layers) and the timing spread of a job.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from moe_bench import identity, schema

from .stats import half_width

ARM = "arm"  # the label column every stage keys its rows by
ARM_ID = "arm_id"  # the arm's hash (identity.arm_hash)


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-missing when no row has it (optional columns: layer, pass, ...)."""
    if name in frame.columns:
        return frame[name]
    return pd.Series(np.nan, index=frame.index, dtype=object)


def plain(value: object) -> str:
    """0.0 -> "0": integer-valued floats (JSON numbers through pandas) print as integers."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# --- arms -------------------------------------------------------------------------------------


def config_columns(frame: pd.DataFrame) -> list[str]:
    """The frame's config columns (identity.is_config_column), seed included."""
    return [c for c in frame.columns if identity.is_config_column(c)]


RUN = "run"  # a job folder's rows of one config: its job_dir, or job_dir#n (see `runs`)


def runs(frame: pd.DataFrame) -> pd.Series:
    """Per row: its run, the unit an arm pools. A job folder's rows share one config, so its
    run is the job_dir; a job that writes rows of several configs into one folder (the race:
    each raced variant's rows carry that variant's columns, the dense reference's rows
    `reference` true) has one run per config, `job_dir#n` in order of first appearance. The
    `run` column where the frame has it (`with_arms`)."""
    if RUN in frame.columns:
        return frame[RUN]
    out = frame["job_dir"].astype(str)
    if frame.empty:
        return out
    cols = config_columns(frame)
    reference = column(frame, "reference").map(is_true)
    several = frame.groupby("job_dir", sort=False)[cols].nunique().gt(1).any(axis=1)
    mixed = several | reference.groupby(frame["job_dir"], sort=False).any()
    for job in mixed[mixed].index:
        part = frame[frame["job_dir"] == job]
        canon = part[cols].map(identity.canonical)
        varying = [c for c in cols if canon[c].dropna().map(repr).nunique() > 1]
        key = canon[varying].map(repr).agg("|".join, axis=1) if varying else ""
        key = key + reference.loc[part.index].map({True: "|reference", False: ""})
        codes = pd.factorize(key)[0]
        if codes.max() > 0:
            out.loc[part.index] = [f"{job}#{c}" for c in codes]
    return out


def job_configs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run (`runs`: per job_dir, or per config within a job that wrote several):
    its config columns (first value present in its rows)."""
    if frame.empty:
        return pd.DataFrame(columns=config_columns(frame))
    return frame.groupby(runs(frame).rename(RUN), sort=False)[config_columns(frame)].first()


def job_arms(frame: pd.DataFrame, without: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per run (`runs`): variant, task, seed, its arm's id (`arm_id`) and label (`arm`); the
    config columns `without` left out of the arm (the figures' series over a swept column). A
    race's reference rows are their own arm (`reference` in its key: "dense (reference)")."""
    configs = job_configs(frame)
    if configs.empty:
        return pd.DataFrame(columns=["variant", "task", "seed", ARM_ID, ARM])
    reference = column(frame, "reference").map(is_true).groupby(runs(frame)).any()
    keys = {}
    for run, row in configs.drop(columns=list(without), errors="ignore").iterrows():
        keys[run] = identity.arm_key(row.to_dict())
        if reference.get(run, False):
            keys[run][identity.REFERENCE] = True
    ids = {run: identity.config_hash(key) for run, key in keys.items()}
    labels = identity.arm_labels({ids[run]: key for run, key in keys.items()})
    out = configs[[c for c in ("variant", "task", "seed") if c in configs]].copy()
    out[ARM_ID] = out.index.map(ids)
    out[ARM] = out[ARM_ID].map(labels)
    return out


def with_arms(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with their `run`, their run's `arm` label and `arm_id` (replaced when
    present)."""
    frame = frame.drop(columns=[c for c in (ARM, ARM_ID, RUN) if c in frame.columns])
    if frame.empty:
        return frame.assign(**{c: pd.Series(dtype=object) for c in (ARM, ARM_ID, RUN)})
    run = runs(frame)
    arms = job_arms(frame)
    frame = frame.assign(**{RUN: run, ARM: run.map(arms[ARM]), ARM_ID: run.map(arms[ARM_ID])})
    # text as Python objects: pandas' Arrow-backed strings (its default since 3.0) cost every
    # row selection a take per column, and the later stages select rows of this wide frame
    # (every config column) hundreds of times per page; the values are the same strings
    text = [c for c, dtype in frame.dtypes.items() if isinstance(dtype, pd.StringDtype)]
    return frame.astype(dict.fromkeys(text, object))


def arm_variants(frame: pd.DataFrame) -> dict[str, str]:
    """arm label -> its variant, in label order."""
    if frame.empty or ARM not in frame:
        return {}
    pairs = frame.groupby(ARM, sort=True)["variant"].first()
    return {str(k): str(v) for k, v in pairs.items()}


# --- selecting rows -------------------------------------------------------------------------

POOL_KEYS = ("job_dir", "step", "domain", "pass")  # what a layer mean keeps apart


def summary_rows(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of `metric` for the whole layer stack, not per expert: the `layer="mean"` rows (or
    rows without a layer); for a job that logged only per-layer rows, their mean."""
    rows = frame[(frame["metric"] == metric) & column(frame, "expert").isna()]
    layer = column(rows, "layer")
    pooled = layer.isna() | (layer.astype(str) == "mean")
    per_layer = rows[~pooled & ~rows["job_dir"].isin(rows.loc[pooled, "job_dir"])]
    if per_layer.empty:
        return rows[pooled]
    keys = [k for k in (*POOL_KEYS, RUN) if k in rows.columns]
    first = {c: "first" for c in rows.columns if c not in keys}
    means = per_layer.groupby(keys, dropna=False, sort=False).agg({**first, "value": "mean"})
    return pd.concat([rows[pooled], means.reset_index().assign(layer="mean")], ignore_index=True)


def find_column(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    """The first config column whose last dotted part is one of `names` and has values, e.g.
    `variant.num_experts` for ("num_experts",)."""
    for name in names:
        for col in frame.columns:
            if col.split(".")[-1] == name and frame[col].notna().any():
                return col
    return None


EXPERTS = ("num_experts",)
TOKENS = ("tokens", "num_tokens")


def routed(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of layers that route: with one expert (dense), balance is trivially perfect."""
    experts = find_column(rows, EXPERTS)
    if experts is None:
        return rows
    return rows[~(pd.to_numeric(rows[experts], errors="coerce") <= 1)]


def is_true(value: Any) -> bool:
    """A boolean cell: True, or "true" as CSV and JSON round trips may write it."""
    return value is True or str(value).lower() == "true"


def leaks(rows: pd.DataFrame) -> pd.Series:
    """Per run (`runs`): whether its layer's routing sees later tokens of its sequence (the runner's
    `leaks_future_tokens` column; rows without it: not known to leak)."""
    recorded = column(rows, "leaks_future_tokens").groupby(runs(rows)).first()
    return recorded.map(lambda v: False if v is None or pd.isna(v) else is_true(v)).astype(bool)


def non_causal(rows: pd.DataFrame) -> list[str]:
    """Arms (labels) with a job whose routing sees later tokens of its sequence."""
    if rows.empty:
        return []
    rows = rows if ARM in rows else with_arms(rows)
    flagged = leaks(rows)
    arm = rows.groupby(runs(rows))[ARM].first()
    return sorted(arm[flagged.reindex(arm.index, fill_value=False)].unique())


# --- the spread of one timed job ----------------------------------------------------------------


def timing_half_width(rows: pd.DataFrame, pass_: str | None) -> pd.Series:
    """Per run (`runs`): the relative half-width of the 95% interval of its layer time, from the
    interleaved ratio to its dense twin (`ratio_ci95` / `ratio_to_dense` of the pass): a rate
    over that time has, to first order, the same relative interval. Empty without the column."""
    timed = rows[(rows["metric"] == schema.RATIO_TO_DENSE.name) & (column(rows, "pass") == pass_)]
    if timed.empty or "ratio_ci95" not in timed:
        return pd.Series(dtype=float)
    half = pd.to_numeric(timed["ratio_ci95"], errors="coerce")
    ratio = pd.to_numeric(timed["value"], errors="coerce")
    return (half / ratio).groupby(runs(timed)).mean()


def sequential_timing(rows: pd.DataFrame) -> bool:
    """Whether these rows time a layer (`tokens_per_s`) against its dense twin
    (`ratio_to_dense`) without a per-round interval on the ratio (`ratio_ci95` absent or all
    null): rows of the earlier protocol, which timed the layer and its twin one after the
    other."""
    timed = rows[rows["metric"] == schema.RATIO_TO_DENSE.name]
    if timed.empty or not (rows["metric"] == schema.TOKENS_PER_S.name).any():
        return False
    return bool(pd.to_numeric(column(timed, "ratio_ci95"), errors="coerce").isna().all())


def steps_half_width(values: pd.Series) -> float:
    """Half-width of the t interval of a mean over logged steps (NaN with fewer than 2)."""
    found = pd.to_numeric(values, errors="coerce").dropna()
    if len(found) < 2:
        return math.nan
    return half_width(float(found.std()), len(found))
