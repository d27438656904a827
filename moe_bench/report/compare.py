"""Compare sweeps side by side (`python -m moe_bench.report BASE CANDIDATE ...`).

Jobs are matched by arm (`frames.job_arms`: the config identity resume uses, minus the seed);
the seeds of one arm are pooled. For each leaderboard metric the first sweep is the baseline
and every other sweep gets its change against it and whether that change exceeds the noise
(`stats.distinct`: Welch's 95% t interval over seeds, else the timed jobs' intervals), as
`pytest-benchmark compare` does for timings. Writes compare.html and prints a text table.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import pandas as pd

from moe_bench import identity, results

from . import frames, leaderboards, stats
from .frames import ARM, ARM_ID, RUN
from .render import render_template
from .stats import Estimate


def _canon(value: object) -> str:
    """A config value as one string whichever file it came from (`identity.canonical`)."""
    value = identity.canonical(value)
    return "—" if value is None else str(value)


def estimates(frame: pd.DataFrame) -> tuple[dict[tuple, Estimate], dict[str, dict[str, str]]]:
    """(arm id, domain, metric label) -> Estimate over the arm's seeds, for every leaderboard
    metric of the sweep's ok rows of jobs that finished; and arm id -> its label and config."""
    bad = frame.loc[frame["status"] != "ok", "job_dir"].unique()
    ok = frames.with_arms(frame[(frame["status"] == "ok") & ~frame["job_dir"].isin(bad)])
    arm_of = ok.groupby(RUN)[ARM_ID].first()
    configs = frames.job_configs(ok)
    shown = {}
    for job, arm in arm_of.items():
        config = {c: _canon(v) for c, v in configs.loc[job].items() if c != "seed"}
        shown.setdefault(arm, {ARM: ok.loc[ok[RUN] == job, ARM].iloc[0], **config})
    out: dict[tuple, Estimate] = {}
    for col in leaderboards.LEADERBOARD:
        for label, final in leaderboards.final_values(ok, col).items():
            table = pd.DataFrame({"value": final.values, "spread": final.spread}).reset_index()
            table["arm"] = table[RUN].map(arm_of)
            for (arm, domain), part in table.groupby(["arm", "domain"], sort=False):
                v = part["value"].dropna()
                if v.empty:
                    continue
                std = float(v.std()) if len(v) > 1 else math.nan
                out[(arm, domain, label)] = Estimate(
                    float(v.mean()), std, len(v), float(part["spread"].mean())
                )
    return out, shown


def compare_frames(frames_: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """One row per (arm, domain, metric) found in the baseline and at least one other sweep:
    the value in each sweep, and per other sweep its change vs the baseline and a verdict
    ("better", "worse": beyond the noise; "~": within it; "=": identical; "?": noise not
    measured)."""
    found = [estimates(f) for f in frames_]
    (base, shown), others = found[0], [f[0] for f in found[1:]]
    better_of = {
        leaderboards.label_of(col, p): col.better
        for col in leaderboards.LEADERBOARD
        for p in (None, *leaderboards.PASS_LABEL)
    }
    records = []
    for key, a in base.items():
        if not any(key in other for other in others):
            continue
        arm, domain, label = key
        record = {**shown[arm], "domain": domain, "metric": label, names[0]: _fmt(a)}
        for name, other in zip(names[1:], others):
            b = other.get(key)
            record[name] = _fmt(b) if b else "—"
            record[f"Δ {name}"] = _change(a, b, better_of.get(label)) if b else ""
        records.append(record)
    table = pd.DataFrame(records)
    if table.empty:
        return table
    # settings shown: those telling apart arms of one variant and task (a swept size)
    base = identity.CONFIG_BASE  # every arm's variant, task, backend, device and dtype
    config = [c for c in table.columns if identity.is_config_column(c) and c not in base]
    by_job = table.groupby(["variant", "task"])
    varying = [c for c in config if by_job[c].nunique().max() > 1]
    keep = ["task", ARM, *sorted(varying), "domain", "metric"]
    rest = [c for c in table.columns if c not in (*config, *base, ARM, "domain", "metric")]
    return table[keep + rest].sort_values(["task", ARM], kind="stable", ignore_index=True)


def _fmt(e: Estimate) -> str:
    text = f"{e.mean:.4g}"
    if not math.isnan(e.std):
        return f"{text} ± {e.std:.2g}"
    if not math.isnan(e.spread):
        return f"{text} (95% ± {e.spread:.2g})"
    return text


def _change(a: Estimate, b: Estimate, better: str | None) -> str:
    """Relative change b vs a and its verdict, e.g. "+12.3% worse"."""
    if a.mean == b.mean:  # bit-identical (deterministic metrics): unchanged, noise or not
        return "+0.0% ="
    if a.mean:
        pct = (b.mean - a.mean) / abs(a.mean) * 100
    else:  # from zero: no relative change, the absolute one instead
        return f"{b.mean - a.mean:+.3g} " + _verdict(a, b, better)
    return f"{pct:+.1f}% " + _verdict(a, b, better)


def _verdict(a: Estimate, b: Estimate, better: str | None) -> str:
    beyond = stats.distinct(a, b)
    if beyond is None:
        return "?"
    if not beyond:
        return "~"
    if better is None:
        return "changed"
    return "better" if (b.mean > a.mean) == (better == "max") else "worse"


def text_table(table: pd.DataFrame) -> str:
    """The comparison as fixed-width text (the terminal view)."""
    if table.empty:
        return "no job of the first sweep matches a job of the others by config"
    return table.to_string(index=False)


def write_html(table: pd.DataFrame, sweeps: list[Path], out: Path) -> Path:
    context = {
        "sweeps": [str(p.resolve()) for p in sweeps],
        "built": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "table": _styled(table),
        "empty": table.empty,
    }
    html = render_template("compare.html.j2", context)
    results.atomic_write(out, html)
    return out


def _styled(table: pd.DataFrame) -> str:
    if table.empty:
        return ""
    classes = pd.DataFrame("", index=table.index, columns=table.columns)
    for col in table.columns:
        if col.startswith("Δ "):
            classes[col] = table[col].map(
                lambda s: (
                    "worse" if s.endswith("worse") else "better" if s.endswith("better") else ""
                )
            )
    return (
        table.style.hide(axis="index")
        .format(escape="html")
        .set_td_classes(classes)
        .set_table_attributes('class="leaderboard"')
        .to_html(table_uuid="compare")
    )


def compare(sweeps: list[Path], out: Path | None = None) -> tuple[Path, str]:
    """Compare the sweeps (first = baseline); write the HTML, return its path and the text."""
    frames = [results.load(p) for p in sweeps]
    names = _names(sweeps)
    table = compare_frames(frames, names)
    path = write_html(table, sweeps, out or sweeps[-1] / "compare.html")
    return path, text_table(table)


def _names(sweeps: list[Path]) -> list[str]:
    """Short column names: each sweep's directory name, numbered when two are alike."""
    names = [p.resolve().name or str(p) for p in sweeps]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names
