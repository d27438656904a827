"""The claims stage: each paper claim a sweep covers (`registry.CLAIMS`), its jobs paired
by seed, and the one rule that turns paired seeds into a verdict (`paired_verdict`).

Jobs are paired by seed within one setting: the same task, model, data, backend and dtype
columns (so the same data and steps), and, when both sides run the same variant, the same value
of every variant field the claim does not compare. Each side's jobs are named by their arm
(`frames.job_arms`), so a claim's figures show that claim's arms only.

`python -m moe_bench.report.claims SWEEP_DIR` prints the covered claims as a markdown table.
Reads result rows only (docs/contract.md §5), never the tasks.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from moe_bench import schema
from moe_bench.identity import ADDED_DEFAULTS, SIZE_FIELDS, canonical

from .. import frames, stats
from ..frames import ARM, column
from .registry import CLAIMS, VAL_LOSS, Check, Claim, Measure, gaps

__all__ = [
    "CLAIMS", "claim_gaps", "evaluate", "markdown", "paired_verdict", "rows_for_report",
]  # fmt: skip

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive at this scale"
NO_VERDICT = "needs 2+ seeds"
SETTING_PREFIXES = ("task.", "model.", "data.")  # with SETTING_COLUMNS: one setting
SETTING_COLUMNS = ("task", "backend", "dtype", "device")


# --- the verdict rule -------------------------------------------------------------------------


class Paired(NamedTuple):
    n: int  # paired seeds
    mean: float  # mean paired difference d, positive when the treatment is better
    se: float  # its standard error sd(d) / sqrt(n)
    low: float  # the 95% t interval of mean d (n - 1 degrees of freedom)
    high: float
    detectable: float  # the smallest mean d this many seeds resolve at the observed sd(d)
    needed: int | None  # seeds that would resolve the observed mean d at the observed sd(d)
    verdict: str


def paired_verdict(treatment: list[float], control: list[float], better: str) -> Paired:
    """For each seed present on both sides, d = the paired difference in the paper's direction
    (positive: the treatment is better, as the paper says). Over the n paired seeds, the 95%
    confidence interval of mean d from Student's t with n - 1 degrees of freedom: mean d ±
    t(0.975, n - 1) · sd(d) / sqrt(n) (sample sd; t = 4.30 at n = 3, 2.78 at n = 5).
    "reproduced" when the interval lies above 0, "contradicted" when it lies below 0,
    "inconclusive at this scale" when it holds 0; fewer than 2 paired seeds: no verdict ("needs
    2+ seeds"). Each result also states n, the interval, the smallest mean d this many seeds
    could resolve at the observed spread (the interval's half-width), and the seeds that would
    resolve the observed mean d. sd(d) = 0 (every seed gives the same d) is not a special case:
    the interval is [d, d], so a constant d > 0 is reproduced, a constant d < 0 contradicted,
    and d = 0 (identical values) inconclusive. A claim with several checks: contradicted when
    any check is contradicted; no verdict when any check has none; reproduced when every "win"
    check is reproduced (a "not worse" check only must not be contradicted); inconclusive
    otherwise."""
    sign = 1.0 if better == "max" else -1.0
    d = sign * (np.asarray(treatment, float) - np.asarray(control, float))
    interval = stats.paired(list(d))
    n, mean = interval.n, interval.mean
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan, math.nan, None, NO_VERDICT)
    sd = interval.se * math.sqrt(n)
    detectable = stats.detectable(sd, n)
    needed = stats.seeds_needed(mean, sd)
    verdict = {1: REPRODUCED, -1: CONTRADICTED, 0: INCONCLUSIVE}[interval.sign()]
    return Paired(n, mean, interval.se, interval.low, interval.high, detectable, needed, verdict)


RULE = inspect.cleandoc(paired_verdict.__doc__ or "")


def combined(checks: tuple[Check, ...], results: list[Paired]) -> str:
    """The claim's verdict from its checks' (the rule's last sentences)."""
    verdicts = [r.verdict for r in results]
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if NO_VERDICT in verdicts:
        return NO_VERDICT
    wins = [r.verdict for c, r in zip(checks, results) if c.must == "win"]
    return REPRODUCED if all(v == REPRODUCED for v in wins) else INCONCLUSIVE


# --- steps to the control's quality (Switch Fig. 1's speed-up in steps) ----------------------


def steps_to_loss(rows: pd.DataFrame, target: float) -> int | None:
    """The first evaluation step at which the job's val_loss is <= target; None if never."""
    evals = rows[rows["metric"] == schema.VAL_LOSS.name].dropna(subset=["value"])
    reached = evals[evals["value"] <= target].sort_values("step")
    return None if reached.empty else int(reached["step"].iloc[0])


# --- jobs, pairs, results ---------------------------------------------------------------------


class Result(NamedTuple):
    claim: Claim
    arms: tuple[list[str], list[str]]  # the arm labels of the treatment's and control's jobs
    setting: str  # the claim's setting, plus what tells this group apart when there are several
    seeds: list[Any]
    numbers: list[tuple[Measure, list[float], list[float]]]  # per check: treatment, control
    checks: list[Paired]
    verdict: str
    steps: list[int | None] | None  # steps_to_control_loss: per seed
    control_steps: int | None  # the control's last evaluation step


def trained_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of finished ok jobs that logged a validation loss. Finished: its rows end with
    the `job` row (docs/contract.md §7), so a killed job's last val_loss is not read as its
    final one; rows from before `job` rows existed have none at all, and all count."""
    trained = frame.loc[frame["metric"] == schema.VAL_LOSS.name, "job_dir"].unique()
    rows = frame[frame["job_dir"].isin(trained)]
    bad = rows.loc[rows["status"] != "ok", "job_dir"].unique()
    rows = rows[~rows["job_dir"].isin(bad)]
    ended = rows.loc[rows["metric"] == schema.JOB.name, "job_dir"].unique()
    return rows[rows["job_dir"].isin(ended)] if len(ended) else rows


def jobs_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per finished ok job that logged a validation loss (index job_dir): its config
    columns (`frames.job_configs`, the arms' identity), its arm label and its setting key."""
    rows = trained_rows(frame)
    if rows.empty:
        return pd.DataFrame()
    jobs = with_added_defaults(frames.job_configs(rows).sort_index())
    arms = (
        rows.groupby(frames.runs(rows), sort=False)[ARM].first()
        if ARM in rows  # labelled already (`frames.with_arms`, the report's stages)
        else frames.job_arms(rows)[ARM]
    )
    jobs[ARM] = arms.reindex(jobs.index)
    setting = [c for c in jobs.columns if c.startswith(SETTING_PREFIXES) or c in SETTING_COLUMNS]
    jobs["_setting"] = _key(jobs[sorted(setting)])
    return jobs


def with_added_defaults(jobs: pd.DataFrame) -> pd.DataFrame:
    """Jobs run before a config field existed, given the value the code then computed
    (`identity.ADDED_DEFAULTS`), so they pair with later jobs of the same setting."""
    jobs = jobs.copy()
    for name, (default, gained) in ADDED_DEFAULTS.items():
        if name not in jobs or default is None:  # a null default: missing already says it
            continue
        missing = jobs[name].isna()
        if gained is not None:
            missing &= jobs["variant"].isin(gained)
        jobs[name] = jobs[name].astype(object).where(~missing, default)
    return jobs


def _key(columns: pd.DataFrame) -> pd.Series:
    """Per row, its values as one string, each in its one spelling (`identity.canonical`: 3
    and 3.0 alike; missing values "None")."""
    return columns.apply(lambda row: "|".join(str(canonical(v)) for v in row), axis=1)


def _group_key(claim: Claim, jobs: pd.DataFrame) -> list[str]:
    """Columns jobs of one pair must share: the setting; for a same-variant claim, also every
    variant field the claim does not compare (sizes derived from it aside)."""
    key = ["_setting"]
    if claim.treatment.variant == claim.control.variant:
        compared = {*claim.treatment.where, *claim.control.where}
        # sizes derived from a compared field (granularity sets E, K and H at equal FLOPs)
        skip = {*compared, *(f"variant.{s}" for s in SIZE_FIELDS)}
        key += [c for c in jobs.columns if c.startswith("variant.") and c not in skip]
    return key


def evaluate(frame: pd.DataFrame, claims: tuple[Claim, ...] = CLAIMS) -> list[Result]:
    """Every claim the sweep covers (both sides present in one setting), one Result per claim
    and setting group; claims without both sides are left out."""
    jobs = jobs_table(frame)
    if jobs.empty:
        return []
    records, variants = jobs.to_dict("records"), set(jobs["variant"])
    by_job: dict[str, pd.DataFrame] = {}  # split once, when a first claim is covered
    out = []
    for claim in claims:
        if not {claim.treatment.variant, claim.control.variant} <= variants:
            continue
        sides = jobs.assign(
            _t=[claim.treatment.matches(job) for job in records],
            _c=[claim.control.matches(job) for job in records],
        )
        sides = sides[sides["_t"] | sides["_c"]]
        if sides.empty:
            continue
        key = _group_key(claim, sides)
        groups = [g for _, g in sides.groupby(_key(sides[key]), sort=True)]
        groups = [g for g in groups if g["_t"].any() and g["_c"].any()]
        if groups and not by_job:
            by_job = dict(tuple(frame.groupby("job_dir", sort=False)))
        varying = _varying(pd.concat(groups), key) if len(groups) > 1 else []
        out += [_result(claim, group, by_job, varying) for group in groups]
    return out


def _varying(jobs: pd.DataFrame, key: list[str]) -> list[str]:
    """Config columns of the pairing key that differ between covered groups (shown with the
    setting when a sweep covers a claim in several)."""
    cols = [c for c in jobs.columns if c in key or c.startswith(SETTING_PREFIXES)]
    return [c for c in cols if c != "_setting" and jobs[c].map(str).nunique() > 1]


def _result(
    claim: Claim, group: pd.DataFrame, by_job: dict[str, pd.DataFrame], varying: list[str]
) -> Result:
    treated, controls = group[group["_t"]], group[group["_c"]]
    seeds = sorted(set(treated["seed"]) | set(controls["seed"]), key=str)

    def per_seed(side: pd.DataFrame, measure: Measure) -> list[float]:
        values = []
        for seed in seeds:
            jobs = side.index[side["seed"] == seed]
            found = [measure.value(by_job[j]) for j in jobs]
            values.append(
                float(np.nanmean(found)) if found and not np.isnan(found).all() else math.nan
            )
        return values

    numbers, checks = [], []
    for check in claim.checks:
        t, c = per_seed(treated, check.measure), per_seed(controls, check.measure)
        numbers.append((check.measure, t, c))
        checks.append(paired_verdict(t, c, check.measure.better))
    steps = control_steps = None
    if claim.steps_to_control_loss:
        steps = []
        for seed, target in zip(seeds, per_seed(controls, VAL_LOSS)):
            jobs = treated.index[treated["seed"] == seed]
            steps.append(
                None if math.isnan(target) or jobs.empty else steps_to_loss(by_job[jobs[0]], target)
            )
        control_rows = by_job[controls.index[0]]
        last = column(control_rows[control_rows["metric"] == schema.VAL_LOSS.name], "step")
        control_steps = int(last.max()) if last.notna().any() else None
    first = group.iloc[0]
    setting = claim.setting + "".join(f"; {c}={first[c]}" for c in varying)
    arms = (sorted(set(treated[ARM])), sorted(set(controls[ARM])))
    verdict = combined(claim.checks, checks)
    return Result(claim, arms, setting, seeds, numbers, checks, verdict, steps, control_steps)


# --- for the report ---------------------------------------------------------------------------


def mean_std(values: list[float], digits: int) -> str:
    """mean ± std over seeds (the values present), or the one value, or —."""
    found = [v for v in values if not math.isnan(v)]
    if not found:
        return "—"
    if len(found) == 1:
        return f"{found[0]:.{digits}f} (1 seed)"
    return f"{np.mean(found):.{digits}f} ± {np.std(found, ddof=1):.{digits}f}"


def steps_text(result: Result) -> str:
    """The step at which each seed of the treatment first reaches the control's final loss."""
    if result.steps is None:
        return ""
    shown = ", ".join("not reached" if s is None else str(s) for s in result.steps)
    ran = f"; {side_names(result)[1]} ran {result.control_steps}" if result.control_steps else ""
    return f"first reaches {side_names(result)[1]}'s final loss at step: {shown} (per seed{ran})"


def interval_text(paired: Paired, digits: int) -> str:
    """`d = 0.050, 95% CI [0.012, 0.088], n = 3 (resolvable at this spread: |d| > 0.038; seeds
    to resolve this d: 4)`."""
    if paired.n < 2:
        return f"d = {paired.mean:.{digits}f}, n = {paired.n}"
    needed = "not within 1000 seeds" if paired.needed is None else str(paired.needed)
    return (
        f"d = {paired.mean:.{digits}f}, 95% CI [{paired.low:.{digits}f}, "
        f"{paired.high:.{digits}f}], n = {paired.n} (resolvable at this spread: |d| > "
        f"{paired.detectable:.{digits}f}; seeds to resolve this d: {needed})"
    )


def side_names(result: Result) -> tuple[str, str]:
    """The treatment's and control's arm labels (joined when a side has several)."""
    treated, control = result.arms
    return " + ".join(treated), " + ".join(control)


def rows_for_report(found: list[Result]) -> list[dict[str, Any]]:
    """One display row per covered claim and setting: claim, source, our setting, our numbers
    (both sides' arms, mean ± std over seeds), each check's paired difference with its
    interval, and the verdict."""
    out = []
    for r in found:
        treated, control = side_names(r)
        numbers = []
        for (measure, t, c), paired in zip(r.numbers, r.checks):
            d = measure.digits
            numbers.append(
                f"{measure.label}: {treated} {mean_std(t, d)} vs {control} {mean_std(c, d)}; "
                f"paired {interval_text(paired, d)}: {paired.verdict}"
            )
        if r.steps is not None:
            numbers.append(steps_text(r))
        out.append(
            {
                "id": r.claim.id,
                "title": r.claim.title,
                "source": r.claim.source,
                "setting": r.setting,
                "numbers": numbers,
                "verdict": r.verdict,
            }
        )
    return out


def claim_gaps(frame: pd.DataFrame) -> list[str]:
    """What the papers do that this run does not (`registry.gaps` on this sweep's jobs)."""
    jobs = jobs_table(frame)
    return [] if jobs.empty else gaps(frame, jobs)


# --- as markdown (README, papers): python -m moe_bench.report.claims SWEEP_DIR -----------------


def markdown(frame: pd.DataFrame) -> str:
    """The covered claims as a markdown table (claim, source, our numbers, verdict), then the
    rule; empty when the sweep covers no claim."""
    rows = rows_for_report(evaluate(frame))
    if not rows:
        return ""
    lines = ["| claim | source | our setting | our numbers | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        source = row["source"]
        cells = [
            f"{row['id']}. {row['title']}",
            f"{source.paper}, {source.where}: {source.reports}",
            row["setting"],
            "<br>".join(row["numbers"]),
            f"**{row['verdict']}**",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join([*lines, "", f"Rule: {' '.join(RULE.split())}"])
