"""Paper claims, reproduced with seeds and verdicts: a registry of small controlled comparisons
and the one rule that turns paired seeds into a verdict (`paired_verdict`).

A claim names a paper's result (paper, table or figure, the number it reports), a treatment
and a control (a variant and config values each, read from the result rows' columns), the
measures the paper compares and which way is better. Jobs are paired by seed within one
setting: the same task, model, data, backend and dtype columns (so the same data and steps),
and, when both sides run the same variant, the same value of every variant field the claim
does not compare. The report's Claims section (`moe_bench.report.build`) shows each claim a
sweep covers; `+experiment=claims` (CPU) and `+experiment=claims_gpu` run them all.

Reads result rows only (docs/contract.md §5), never the tasks.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from moe_bench import results, schema
from moe_bench.report.figures import column, summary_rows
from moe_bench.report.sections import job_specialisation

REPRODUCED = "reproduced"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive at this scale"
NO_VERDICT = "needs 2+ seeds"
SE_MULTIPLE = 2.0
SETTING_PREFIXES = ("task.", "model.", "data.")  # with SETTING_COLUMNS: one setting
SETTING_COLUMNS = ("task", "backend", "dtype", "device")
# sizes derived from a compared field (granularity sets E, K and H at equal active FLOPs)
DERIVED = ("variant.num_experts", "variant.top_k", "variant.expert_hidden", "variant.d_ff")


# --- measures: one number per job, from its rows ----------------------------------------------


def _last(rows: pd.DataFrame) -> float:
    """The value at the last recorded step (NaN without rows)."""
    rows = rows.dropna(subset=["value"])
    if rows.empty:
        return math.nan
    return float(rows.sort_values("step", na_position="first")["value"].iloc[-1])


def final_val_loss(rows: pd.DataFrame) -> float:
    return _last(rows[rows["metric"] == schema.VAL_LOSS.name])


def final_max_vio_global(rows: pd.DataFrame) -> float:
    """MaxVio_global over the validation set at the last evaluation, mean over MoE layers."""
    return _last(summary_rows(rows, schema.MAX_VIO_GLOBAL.name))


def mean_drop_fraction(rows: pd.DataFrame) -> float:
    """Dropped / demanded assignments in training, mean over the logged steps (and layers)."""
    values = summary_rows(rows, schema.DROP_FRACTION.name)["value"].dropna()
    return float(values.mean()) if len(values) else math.nan


def domain_specialisation(rows: pd.DataFrame) -> float:
    """JS divergence (bits) between the prose and code expert loads at the last evaluation,
    mean over MoE layers (`report.sections.job_specialisation`'s math)."""
    per_layer = job_specialisation(rows)
    return float(per_layer["js"].mean()) if not per_layer.empty else math.nan


@dataclass(frozen=True)
class Measure:
    label: str
    better: str  # "min" or "max": the direction the paper says is better
    value: Callable[[pd.DataFrame], float]  # the rows of one job -> its number
    digits: int = 3


VAL_LOSS = Measure("final val loss (nats/byte)", "min", final_val_loss)
MAX_VIO = Measure("MaxVio_global", "min", final_max_vio_global)
DROPS = Measure("dropped fraction (training)", "min", mean_drop_fraction, 4)
SPECIALISATION = Measure("prose/code JS divergence (bits)", "max", domain_specialisation)


@dataclass(frozen=True)
class Check:
    """One measure of a claim. `must`: "win" (the paired difference must favour the treatment
    beyond the noise) or "not worse" (it must only not favour the control beyond the noise)."""

    measure: Measure
    must: str = "win"


# --- claims -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    paper: str
    where: str  # table or figure
    reports: str  # what the paper reports there


Match = Any  # a value, a tuple of allowed values (None: the column is absent), or a predicate


@dataclass(frozen=True)
class Side:
    """Jobs of one side of a claim: this variant, with these config columns."""

    variant: str
    where: Mapping[str, Match] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.variant

    def matches(self, job: pd.Series) -> bool:
        return job["variant"] == self.variant and all(
            _matches(job.get(key), want) for key, want in self.where.items()
        )


def _matches(value: Any, want: Match) -> bool:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    if callable(want):
        return not missing and bool(want(value))
    allowed = want if isinstance(want, tuple) else (want,)
    return any((missing if a is None else (not missing and value == a)) for a in allowed)


@dataclass(frozen=True)
class Claim:
    id: str
    title: str
    source: Source
    treatment: Side
    control: Side
    checks: tuple[Check, ...]
    setting: str  # our setting, one line
    steps_to_control_loss: bool = False  # also: the step each seed first reaches the control's


SWITCH = Source(
    "Fedus et al. 2021, Switch Transformer (arXiv:2101.03961)",
    "Sec. 3.1-3.2 (Figs. 4-5), Table 1",
    "Switch-Base 64E reaches T5-Base's step-450k quality at step 60k (7.5x in steps; 1/7 the "
    "time, Fig. 5); Table 1, 100k steps: T5-Base -1.731 vs Switch-Base cf 1.0 -1.561 "
    "neg. log perp.",
)
CLAIMS = (
    Claim(
        "1a",
        "Switch (top-1) beats dense at equal active FLOPs",
        SWITCH,
        Side("switch", {"variant.capacity_factor": 1.0}, "switch cf 1.0"),
        Side("dense"),
        (Check(VAL_LOSS),),
        "switch (top-1, capacity factor 1.0) vs the dense FFN of the same active FLOPs",
        steps_to_control_loss=True,
    ),
    Claim(
        "1b",
        "DeepSeekMoE beats dense at equal active FLOPs",
        SWITCH,
        Side("deepseek_moe", {"variant.granularity": 4, "variant.balance_scope": "micro_batch"}),
        Side("dense"),
        (Check(VAL_LOSS),),
        "deepseek_moe (m=4, 1 shared) vs the dense FFN of the same active FLOPs",
        steps_to_control_loss=True,
    ),
    Claim(
        "1c",
        "Switch (top-1) without capacity drops beats dense at equal active FLOPs",
        SWITCH,
        Side("switch", {"variant.capacity_factor": (None,)}, "switch dropless"),
        Side("dense"),
        (Check(VAL_LOSS),),
        "switch (top-1, dropless) vs the dense FFN of the same active FLOPs: 1a without drops",
        steps_to_control_loss=True,
    ),
    Claim(
        "2",
        "Fine-grained + shared experts beat GShard top-2 at equal total and active parameters",
        Source(
            "Dai et al. 2024, DeepSeekMoE (arXiv:2401.06066)",
            "Tables 1-2",
            "Pile loss: GShard 1.867 vs DeepSeekMoE 1.808 (both 2.0B total, 0.3B active, 100B "
            "tokens); DeepSeekMoE ahead on all 10 benchmarks; Table 2: GShard x1.5 also 1.808",
        ),
        Side("deepseek_moe", {"variant.granularity": 4, "variant.balance_scope": "micro_batch"}),
        Side("gshard"),
        (Check(VAL_LOSS),),
        "deepseek_moe (m=4: 63 routed top-7 + 1 shared) vs gshard (16 experts, top-2)",
    ),
    Claim(
        "2b",
        "Finer expert segmentation helps (granularity 4 vs 1, both with a shared expert)",
        Source(
            "Dai et al. 2024, DeepSeekMoE (arXiv:2401.06066)",
            "Fig. 3",
            "normalised scores on 6 benchmarks rise from 1 shared + 1/15 routed to 1+3/31 to "
            "1+7/63 at equal total and active params (bar chart: no values, no Pile loss)",
        ),
        Side("deepseek_moe", {"variant.granularity": 4}, "deepseek_moe m=4"),
        Side("deepseek_moe", {"variant.granularity": 1}, "deepseek_moe m=1"),
        (Check(VAL_LOSS),),
        "deepseek_moe m=4 vs m=1, 1 shared expert each (GPU preset only)",
    ),
    Claim(
        "3",
        "Loss-free bias balancing lowers MaxVio_global at equal or better loss",
        Source(
            "Wang et al. 2024, Auxiliary-Loss-Free Load Balancing (arXiv:2408.15664)",
            "Table 2",
            "aux loss (alpha 1e-3) vs loss-free: 1B ppl 9.56 vs 9.50, MaxVio_global 0.72 vs "
            "0.04; 3B ppl 7.97 vs 7.92, MaxVio_global 0.52 vs 0.04",
        ),
        Side("deepseek_v3", {"variant.bias_update_rate": lambda v: v > 0}, "bias update on"),
        Side("deepseek_v3", {"variant.bias_update_rate": 0.0}, "bias update off"),
        (Check(MAX_VIO), Check(VAL_LOSS, "not worse")),
        "deepseek_v3 with bias updates (rate 1e-3) vs without, sequence loss 1e-4 on both",
    ),
    Claim(
        "4",
        "A larger capacity factor drops fewer tokens and reaches a lower loss",
        Source(
            "Fedus et al. 2021, Switch Transformer (arXiv:2101.03961)",
            "Table 1",
            "Switch-Base at 100k steps: cf 2.0 -1.554 neg. log perp., 860 ex/s; cf 1.0 -1.561, "
            "1000 ex/s (cf 1.25 -1.553, 910); hours to -1.50: 72.8 (cf 2.0) vs 62.8 (cf 1.0)",
        ),
        Side("switch", {"variant.capacity_factor": 2.0}, "switch cf 2.0"),
        Side("switch", {"variant.capacity_factor": 1.0}, "switch cf 1.0"),
        (Check(DROPS), Check(VAL_LOSS)),
        "switch at capacity factor 2.0 vs 1.0 (speed not judged: CPU timings are shared)",
    ),
    Claim(
        "4b",
        "Dropless routing drops nothing and reaches a lower loss than capacity factor 1.0",
        Source(
            "Fedus et al. 2021, Switch Transformer (arXiv:2101.03961)",
            "Table 1",
            "no dropless row; Switch-Base at 100k steps: cf 1.0 -1.561, cf 1.25 -1.553, cf 2.0 "
            "-1.554 neg. log perp.; Sec. 2.2: dropped tokens 'typically < 1%'",
        ),
        Side("switch", {"variant.capacity_factor": (None,)}, "switch dropless"),
        Side("switch", {"variant.capacity_factor": 1.0}, "switch cf 1.0"),
        (Check(DROPS), Check(VAL_LOSS)),
        "switch without capacity vs capacity factor 1.0",
    ),
    Claim(
        "5a",
        "Expert choice converges faster than token choice at equal active compute",
        Source(
            "Zhou et al. 2022, Expert Choice routing (arXiv:2202.09368)",
            "abstract",
            "more than 2x faster training convergence than top-1 and top-2 gating",
        ),
        Side("expert_choice", {"variant.selection_scope": ("batch", None)}, "expert_choice"),
        Side("gshard"),
        (Check(VAL_LOSS),),
        "expert_choice (capacity 2, selection over the batch) vs gshard top-2",
    ),
    Claim(
        "5b",
        "Part of expert choice's gain in a causal LM is the future-token leak",
        Source(
            "Zhou et al. 2022 (arXiv:2202.09368) evaluate non-causal settings",
            "Sec. 3.2",
            "experts choose over the batch, later tokens of a sequence included",
        ),
        Side("expert_choice", {"variant.selection_scope": ("batch", None)}, "batch (leaks)"),
        Side("expert_choice", {"variant.selection_scope": "position"}, "position (causal)"),
        (Check(VAL_LOSS),),
        "expert_choice selecting over the whole batch vs among tokens at the same position",
    ),
    Claim(
        "6",
        "Global-batch balance gives more domain specialisation than micro-batch balance",
        Source(
            "Qiu et al. 2025, global-batch load balance (arXiv:2501.11873)",
            "Table 1, Sec. 4.2 (Fig. 1b)",
            "3.4A0.6B, 120B tokens: Avg PPL 8.167 micro-batch LBL (Balance BSZ 4) vs 8.038 global "
            "(512); expert selection freq. none > 0.15 (micro) vs many > 0.2 on SFT-Math (global)",
        ),
        Side("deepseek_moe", {"variant.balance_scope": "global_batch"}, "global batch"),
        Side("deepseek_moe", {"variant.balance_scope": "micro_batch"}, "micro batch"),
        (Check(SPECIALISATION), Check(VAL_LOSS, "not worse")),
        "deepseek_moe, f counted over the step's global batch vs each micro-batch (gradient "
        "accumulation: task.micro_batch_size)",
    ),
)


# --- the verdict rule -------------------------------------------------------------------------


class Paired(NamedTuple):
    n: int  # paired seeds
    mean: float  # mean paired difference, positive when the treatment is better
    se: float  # its standard error
    verdict: str


def paired_verdict(treatment: list[float], control: list[float], better: str) -> Paired:
    """For each seed present on both sides, d = the paired difference in the paper's direction
    (positive: the treatment is better, as the paper says). Over the n paired seeds, mean d and
    its standard error SE = sd(d) / sqrt(n) (sample sd). "reproduced" when mean d > 2 SE,
    "contradicted" when mean d < -2 SE, "inconclusive at this scale" otherwise; fewer than 2
    paired seeds: no verdict ("needs 2+ seeds"). SE = 0 (every seed gives the same d) is not a
    special case: a constant d > 0 is reproduced, a constant d < 0 contradicted, and d = 0
    (identical values) inconclusive. A claim with several checks: contradicted when any check
    is contradicted; no verdict when any check has none; reproduced when every "win" check is
    reproduced (a "not worse" check only must not be contradicted); inconclusive otherwise."""
    sign = 1.0 if better == "max" else -1.0
    d = sign * (np.asarray(treatment, float) - np.asarray(control, float))
    d = d[~np.isnan(d)]
    n = len(d)
    if n < 2:
        return Paired(n, float(d.mean()) if n else math.nan, math.nan, NO_VERDICT)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    if mean > SE_MULTIPLE * se:
        return Paired(n, mean, se, REPRODUCED)
    if mean < -SE_MULTIPLE * se:
        return Paired(n, mean, se, CONTRADICTED)
    return Paired(n, mean, se, INCONCLUSIVE)


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
    setting: str  # the claim's setting, plus what tells this group apart when there are several
    seeds: list[Any]
    numbers: list[tuple[Measure, list[float], list[float]]]  # per check: treatment, control
    checks: list[Paired]
    verdict: str
    steps: list[int | None] | None  # steps_to_control_loss: per seed
    control_steps: int | None  # the control's last evaluation step


def jobs_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per finished ok convergence job (index job_dir): its config columns (the
    first row's) and its setting key."""
    rows = frame[frame["task"] == "convergence"]
    bad = rows.loc[rows["status"] != "ok", "job_dir"].unique()
    rows = rows[~rows["job_dir"].isin(bad)]
    if rows.empty:
        return pd.DataFrame()
    config = [c for c in rows.columns if "." in c or c in ("variant", "seed", *SETTING_COLUMNS)]
    jobs = rows.groupby("job_dir", sort=True)[config].first()
    setting = [c for c in jobs.columns if c.startswith(SETTING_PREFIXES) or c in SETTING_COLUMNS]
    jobs["_setting"] = _key(jobs[sorted(setting)])
    return jobs


def _key(columns: pd.DataFrame) -> pd.Series:
    """Per row, its values as one string (missing values included: "nan")."""
    return columns.apply(lambda row: "|".join(map(str, row)), axis=1)


def _group_key(claim: Claim, jobs: pd.DataFrame) -> list[str]:
    """Columns jobs of one pair must share: the setting; for a same-variant claim, also every
    variant field the claim does not compare (sizes derived from it aside)."""
    key = ["_setting"]
    if claim.treatment.variant == claim.control.variant:
        compared = {*claim.treatment.where, *claim.control.where}
        skip = {*compared, *DERIVED}
        key += [c for c in jobs.columns if c.startswith("variant.") and c not in skip]
    return key


def evaluate(frame: pd.DataFrame, claims: tuple[Claim, ...] = CLAIMS) -> list[Result]:
    """Every claim the sweep covers (both sides present in one setting), one Result per claim
    and setting group; claims without both sides are left out."""
    jobs = jobs_table(frame)
    if jobs.empty:
        return []
    by_job = dict(tuple(frame.groupby("job_dir", sort=False)))
    out = []
    for claim in claims:
        sides = jobs.assign(
            _t=jobs.apply(claim.treatment.matches, axis=1),
            _c=jobs.apply(claim.control.matches, axis=1),
        )
        sides = sides[sides["_t"] | sides["_c"]]
        if sides.empty:
            continue
        key = _group_key(claim, sides)
        groups = [g for _, g in sides.groupby(_key(sides[key]), sort=True)]
        groups = [g for g in groups if g["_t"].any() and g["_c"].any()]
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
    return Result(
        claim, setting, seeds, numbers, checks, combined(claim.checks, checks), steps, control_steps
    )


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
    ran = (
        f"; {result.claim.control.name} ran {result.control_steps}" if result.control_steps else ""
    )
    return (
        f"first reaches {result.claim.control.name}'s final loss at step: {shown} (per seed{ran})"
    )


def rows_for_report(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One display row per covered claim and setting: claim, source, our setting, our numbers
    (both sides, mean ± std over seeds), the verdict and each check's paired difference."""
    out = []
    for r in evaluate(frame):
        numbers = []
        for (measure, t, c), paired in zip(r.numbers, r.checks):
            d = measure.digits
            se = "" if math.isnan(paired.se) else f" ± SE {paired.se:.{d}f}"
            numbers.append(
                f"{measure.label}: {r.claim.treatment.name} {mean_std(t, d)} vs "
                f"{r.claim.control.name} {mean_std(c, d)}; paired d = {paired.mean:.{d}f}{se} "
                f"over {paired.n} seeds: {paired.verdict}"
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


def measured_drops(frame: pd.DataFrame, jobs: pd.DataFrame) -> list[str]:
    """One line per capacity-limited setting of this sweep that dropped assignments: the share
    it dropped in training (mean over steps and seeds), beside Switch's "typically < 1%"."""
    found = []
    by_job = dict(tuple(frame.groupby("job_dir", sort=False)))
    cf = "variant.capacity_factor"
    if cf not in jobs:
        return []
    for (variant, factor), part in jobs.dropna(subset=[cf]).groupby(["variant", cf]):
        drops = [mean_drop_fraction(by_job[j]) for j in part.index]
        drops = [d for d in drops if not math.isnan(d)]
        if drops and max(drops) > 0:  # expert choice's capacity drops nothing by construction
            found.append(
                f"Measured: {variant} at capacity factor {factor:g} dropped "
                f"{100 * float(np.mean(drops)):.1f}% of its assignments in training (mean over "
                f"steps, {len(drops)} seeds); Switch (Sec. 2.2) reports typically < 1%."
            )
    return found


def gaps(frame: pd.DataFrame) -> list[str]:
    """What the papers do that this run does not: facts from the code and the rows' config."""
    jobs = jobs_table(frame)
    if jobs.empty:
        return []
    job = jobs.iloc[0]

    def get(name: str) -> Any:
        return job.get(name, "?")

    tokens = get("task.batch_size") * get("task.seq_len") if "task.seq_len" in job else "?"
    return [
        f"Scale: a byte-level LM of width {get('model.d_model')} with {get('task.n_layers')} "
        f"layers, {get('task.steps')} steps of {tokens} tokens; the papers train models of "
        "10^8 to 10^12 parameters on billions of tokens or more.",
        f"Schedule: AdamW, peak lr {get('task.lr')}, {get('task.warmup_steps')} linear warm-up "
        "steps, cosine decay to 10% (moe_bench/tasks/convergence.py); not tuned per variant.",
        "Router init: nn.Linear's default (Kaiming uniform, std 1/sqrt(3 D), "
        "variants/contract/routing.py); expert weights normal with std 1/sqrt(fan-in) "
        "(variants/compute/experts.py). Switch (Sec. 2.4) scales its initialisation down 10x.",
        "Router z-loss: off (z_loss_coef = 0 on switch and gshard); ST-MoE "
        "(arXiv:2202.08906) uses 1e-3. No input jitter (jitter_eps = 0).",
        "Capacity: switch and gshard drop over-capacity assignments in evaluation too "
        "(the dropped token keeps its residual only); deepseek_moe, deepseek_v3 and dense "
        "are dropless.",
        *measured_drops(frame, jobs),
        "Expert choice selects among all tokens of a forward, later tokens of a sequence "
        "included; its loss in this causal LM is not comparable (claim 5b measures the share).",
    ]


# --- as markdown (README, papers): python -m moe_bench.claims SWEEP_DIR ------------------------


def markdown(frame: pd.DataFrame) -> str:
    """The covered claims as a markdown table (claim, source, our numbers, verdict), then the
    rule; empty when the sweep covers no claim."""
    rows = rows_for_report(frame)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_bench.claims",
        description="Print the paper claims a sweep covers, with verdicts, as a markdown table.",
    )
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (or a saved report's)")
    args = parser.parse_args(argv)
    try:
        frame = results.load(args.sweep_dir)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    text = markdown(frame)
    print(text or f"{args.sweep_dir}: no claim of moe_bench/claims.py is covered by this sweep")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
