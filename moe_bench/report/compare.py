"""Compare sweeps side by side (`python -m moe_bench.report BASE CANDIDATE ...`).

Jobs are matched by config: variant, task, backend, dtype, device and every dotted config
column except seeds; the seeds of one config are pooled. For each leaderboard metric the first
sweep is the baseline and every other sweep gets its change against it and whether that change
exceeds the noise (`sections.distinct`: 2 standard errors over seeds, else the timing IQRs), as
`pytest-benchmark compare` does for timings. Writes compare.html and prints a text table.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import pandas as pd

from moe_bench import results

from . import build, sections

MATCH = ("variant", "task", "backend", "dtype", "device")


def _canon(value: Any) -> str:
    """One spelling per config value whichever file it came from: a JSON list and its CSV
    text, 3 and 3.0, None and NaN."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if number.is_integer() else repr(number)


def config_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that define a job's config: MATCH plus dotted config keys, seeds left out."""
    dotted = [c for c in frame.columns if "." in c and c.split(".")[-1] != "seed"]
    return [c for c in MATCH if c in frame.columns] + sorted(dotted)


def job_configs(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Per job_dir: its config as one hashable tuple of (column, value) pairs."""
    present = [c for c in columns if c in frame.columns]
    firsts = frame.groupby("job_dir")[present].agg(
        lambda s: next((v for v in s if v is not None and not _isnan(v)), None)
    )
    return firsts.apply(lambda r: tuple((c, _canon(r.get(c))) for c in columns), axis=1)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def estimates(frame: pd.DataFrame, columns: list[str]) -> dict[tuple, sections.Estimate]:
    """(config, domain, metric label) -> Estimate over the config's seeds, for every
    leaderboard metric of the sweep's ok rows of jobs that finished."""
    configs = job_configs(frame, columns)
    bad = frame.loc[frame["status"] != "ok", "job_dir"].unique()
    ok = frame[(frame["status"] == "ok") & ~frame["job_dir"].isin(bad)]
    out: dict[tuple, sections.Estimate] = {}
    for col in build.LEADERBOARD:
        for label, (values, spread) in build._final_values(ok, col).items():
            table = pd.DataFrame({"value": values, "spread": spread}).reset_index()
            table["config"] = table["job_dir"].map(configs)
            for (config, domain), part in table.groupby(["config", "domain"], sort=False):
                v = part["value"].dropna()
                if v.empty:
                    continue
                std = float(v.std()) if len(v) > 1 else math.nan
                spr = float(part["spread"].mean())
                out[(config, domain, label)] = sections.Estimate(float(v.mean()), std, len(v), spr)
    return out


def compare_frames(frames: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    """One row per (config, domain, metric) found in the baseline and at least one other
    sweep: the value in each sweep, and per other sweep its change vs the baseline and a
    verdict ("better", "worse": beyond the noise; "~": within it; "=": identical; "?": noise
    not measured)."""
    columns = sorted(set().union(*(config_columns(f) for f in frames)), key=_column_order)
    found = [estimates(f, columns) for f in frames]
    base, others = found[0], found[1:]
    specs = {label: col for col in build.LEADERBOARD for label in _labels(col)}
    records = []
    for key, a in base.items():
        if not any(key in other for other in others):
            continue
        config, domain, label = key
        record = {**dict(config), "domain": domain, "metric": label, names[0]: _fmt(a)}
        better = _better(label, specs)
        for name, other in zip(names[1:], others):
            b = other.get(key)
            record[name] = _fmt(b) if b else "—"
            record[f"Δ {name}"] = _change(a, b, better) if b else ""
        records.append(record)
    table = pd.DataFrame(records)
    if table.empty:
        return table
    # settings shown: those telling apart configs of one variant and task (a swept size)
    by_job = table.groupby(["variant", "task"])
    varying = [
        c for c in columns if c not in MATCH and c in table and by_job[c].nunique().max() > 1
    ]
    keep = ["task", "variant", *varying, "domain", "metric"]
    rest = [c for c in table.columns if c not in columns and c not in ("domain", "metric")]
    order = [c for c in keep if c in table]
    return table[order + rest].sort_values(order[:2], kind="stable", ignore_index=True)


def _column_order(name: str) -> tuple[int, str]:
    return (MATCH.index(name), "") if name in MATCH else (len(MATCH), name)


def _labels(col: build.Column) -> list[str]:
    unit = f" [{col.unit}]" if col.unit else ""
    arrow = build.ARROW[col.better]
    return [f"{col.label}{sfx}{unit}{arrow}" for sfx in ("", " fwd", " fwd+bwd")]


def _better(label: str, specs: dict[str, build.Column]) -> str | None:
    col = specs.get(label)
    return col.better if col else None


def _fmt(e: sections.Estimate) -> str:
    text = f"{e.mean:.4g}"
    if not math.isnan(e.std):
        return f"{text} ± {e.std:.2g}"
    if not math.isnan(e.spread):
        return f"{text} (IQR {e.spread:.2g})"
    return text


def _change(a: sections.Estimate, b: sections.Estimate, better: str | None) -> str:
    """Relative change b vs a and its verdict, e.g. "+12.3% worse"."""
    if a.mean == b.mean:  # bit-identical (deterministic metrics): unchanged, noise or not
        return "+0.0% ="
    if a.mean:
        pct = (b.mean - a.mean) / abs(a.mean) * 100
    else:  # from zero: no relative change, the absolute one instead
        return f"{b.mean - a.mean:+.3g} " + _verdict(a, b, better)
    return f"{pct:+.1f}% " + _verdict(a, b, better)


def _verdict(a: sections.Estimate, b: sections.Estimate, better: str | None) -> str:
    beyond = sections.distinct(a, b)
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
    html = build.render_template("compare.html.j2", context)
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
