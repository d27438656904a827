"""`python -m moe_bench.history METRIC [ROOT ...] [--where SQL] [--by date|commit]`: one metric
of matched arms across sweeps, in the order of their dates or commits, with intervals (as asv
draws a benchmark across commits).

Every sweep under the ROOTs (default `multirun`) is read through one DuckDB view
(`moe_bench.results.connect`). A job's value is its metric at its last step (the mean where
several rows share it); `--where` narrows the rows first (SQL over the view's columns, e.g.
`layer = 'mean'`, `"pass" = 'fwd_bwd'`, `variant IN ('switch', 'dense')`). A series is an arm
(`moe_bench.identity`: the config minus the seed) and the metric's key columns the rows have;
a point is a sweep: the mean over the arm's ok jobs (its seeds), with the 95% t interval
(`moe_bench.report.stats.half_width`; one seed: no interval). A sweep's commit and date are
those of its jobs (job.json); each point says whether it moved from the series' previous point
beyond the noise (`stats.distinct`, Welch's interval: "~" is within it, a tie).

Writes the figure and its table: `--out` ending .html (default `history.html`: the figure and
the table in one page) or .png (the figure alone); prints the table.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: drawn on headless machines
import matplotlib.pyplot as plt
import pandas as pd

from moe_bench import query, results, schema
from moe_bench.report import stats

SHORT = 8  # hex digits of a commit on the axis


def job_values(con: Any, metric: str, where: str | None, keys: list[str]) -> pd.DataFrame:
    """One row per (ok job, key values): the metric's mean at the job's last step; a bad
    `where` is a ValueError with DuckDB's words."""
    filters = f" AND ({where})" if where else ""
    picked = ", ".join(f'"{k}"' for k in keys)
    group = f", {picked}" if keys else ""
    sql = f"""WITH m AS (SELECT * FROM rows WHERE metric = ? AND state = 'ok'
                       AND value IS NOT NULL{filters}),
        last AS (SELECT sweep, job_dir, max(coalesce(step, -1)) AS at FROM m GROUP BY ALL)
        SELECT m.sweep, m.job_dir, m.arm_id, m.arm, m.commit, m.date{group},
               avg(m.value) AS value
        FROM m JOIN last ON m.sweep = last.sweep AND m.job_dir = last.job_dir
                        AND coalesce(m.step, -1) = last.at
        GROUP BY m.sweep, m.job_dir, m.arm_id, m.arm, m.commit, m.date{group}"""
    try:
        return con.execute(sql, [metric]).df()
    except query.duckdb_module().Error as e:
        raise ValueError(f"--where {where!r}: {e}") from None


def commit_order(cwd: Path | None = None) -> dict[str, int]:
    """Commit -> its position in this checkout's history (oldest first); {} outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-list", "--reverse", "HEAD"], cwd=cwd or Path(__file__).parent,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return {c: i for i, c in enumerate(out.split())}


def sweeps_in_order(values: pd.DataFrame, by: str) -> pd.DataFrame:
    """One row per sweep: its commit (the most common of its jobs), date (the earliest) and
    label, ordered by date, or by commit in this checkout's history (then date)."""
    rows = []
    for sweep, jobs in values.groupby("sweep"):
        commits = jobs["commit"].dropna()
        commit = commits.mode().iloc[0] if len(commits) else None
        rows.append({"sweep": sweep, "commit": commit, "date": jobs["date"].dropna().min()})
    table = pd.DataFrame(rows)
    order = commit_order() if by == "commit" else {}
    table["rank"] = table["commit"].map(lambda c: order.get(c, math.inf))
    table = table.sort_values(["rank", "date", "sweep"], ignore_index=True)
    short = table["commit"].map(lambda c: str(c)[:SHORT] if c else "no commit")
    table["label"] = short + "\n" + table["date"].fillna("").astype(str).str[:10]
    return table.drop(columns="rank")


def history(values: pd.DataFrame, keys: list[str], by: str, better: str | None) -> pd.DataFrame:
    """One row per (series, sweep): mean over the arm's jobs, sd, n, 95% half-width, and the
    change from the series' previous sweep (better / worse / changed beyond the noise, ~)."""
    sweeps = sweeps_in_order(values, by)
    position = {s: i for i, s in enumerate(sweeps["sweep"])}
    series = ["arm", *keys]
    out = []
    for name, part in values.groupby(series, dropna=False, sort=True):
        previous = None
        for sweep, jobs in sorted(part.groupby("sweep"), key=lambda p: position[p[0]]):
            v = jobs["value"].astype(float)
            sd = float(v.std()) if len(v) > 1 else math.nan
            here = stats.Estimate(float(v.mean()), sd, len(v))
            found = sweeps.loc[position[sweep]]
            out.append(
                {
                    **dict(zip(series, name if isinstance(name, tuple) else (name,))),
                    "sweep": sweep, "commit": found["commit"], "date": found["date"],
                    "order": position[sweep], "label": found["label"], "mean": here.mean,
                    "sd": sd, "n": here.n, "ci95": stats.half_width(sd, here.n),
                    "vs previous": _move(previous, here, better),
                }
            )  # fmt: skip
            previous = here
    return pd.DataFrame(out)


def _move(before: stats.Estimate | None, now: stats.Estimate, better: str | None) -> str:
    if before is None:
        return ""
    beyond = stats.distinct(before, now)
    if beyond is None:
        return "? (one seed: no interval)"
    if not beyond:
        return "~"
    if better is None:
        return "changed"
    return "better" if (now.mean > before.mean) == (better == "max") else "worse"


def figure(table: pd.DataFrame, metric: str, keys: list[str]) -> bytes:
    """The history as PNG bytes: one line per series over the sweeps, 95% intervals as bars."""
    labels = table.drop_duplicates("order").sort_values("order")["label"].tolist()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 3), 4.2))
    for name, part in table.groupby(["arm", *keys], dropna=False, sort=True):
        part = part.sort_values("order")
        text = " · ".join(str(n) for n in (name if isinstance(name, tuple) else (name,)))
        ax.errorbar(
            part["order"], part["mean"], yerr=part["ci95"].fillna(0.0), marker="o",
            capsize=3, label=text,
        )  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    unit = schema.metric(metric).unit
    ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
    ax.set_title(f"{metric} across sweeps (mean over seeds, 95% interval)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write(table: pd.DataFrame, metric: str, keys: list[str], out: Path) -> Path:
    png = figure(table, metric, keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        out.write_bytes(png)
        return out
    shown = table.drop(columns=["order", "label"]).to_html(index=False, float_format="%.5g")
    image = base64.b64encode(png).decode()
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(metric)} history</title>"
        f"<h1>{html.escape(metric)} across sweeps</h1>"
        f"<img alt='{html.escape(metric)} per sweep' src='data:image/png;base64,{image}'>"
        f"<p>Mean over each arm's seeds with its 95% t interval; 'vs previous': beyond the "
        f"noise (Welch's interval) or '~' within it.</p>{shown}"
    )
    results.atomic_write(out, page)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_bench.history", description=__doc__)
    parser.add_argument("metric", help="a schema metric, e.g. val_loss")
    parser.add_argument("roots", nargs="*", type=Path, default=[Path("multirun")])
    parser.add_argument("--where", help="SQL condition on the rows view, e.g. \"layer = 'mean'\"")
    parser.add_argument("--by", choices=("date", "commit"), default="date")
    parser.add_argument("--out", type=Path, default=Path("history.html"), help=".html or .png")
    args = parser.parse_args(argv)
    try:
        metric = schema.metric(args.metric)
        if args.out.suffix not in (".html", ".png"):
            raise ValueError(f"--out={args.out} must end with .html or .png")
        con = results.connect(*args.roots)
        columns = {c[0] for c in con.execute("DESCRIBE rows").fetchall()}
        keys = [k for k in metric.keys if k in columns]
        values = job_values(con, metric.name, args.where, keys)
        if values.empty:
            raise ValueError(f"no ok rows of metric={metric.name!r} match under the roots")
        keys = [k for k in keys if values[k].notna().any()]
        table = history(values, keys, args.by, metric.better)
    except (ValueError, ImportError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.drop(columns=["order", "label"]).to_string(index=False))
    print(write(table, metric.name, keys, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
