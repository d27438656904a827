"""Render: a sweep's stages put together into one self-contained HTML page.

`build_report(sweep_dir)` runs the stages in order (load -> frames -> leaderboards -> claims
-> figures) and writes `report.html` (inline CSS and SVG, no network) and `results.csv` (the
tidy rows with their run card, to re-plot) into the sweep directory. Sections with no data
are listed with the reason instead of being drawn empty. Only ok and failed jobs feed the
leaderboards and figures (failed ones as failures); the others are listed in a table of their
own.
"""

from __future__ import annotations

import datetime
import functools
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import pandas as pd

from moe_bench import results

from . import claims, frames, invariance, load, sections
from .figures import FIGURES, SCALE_FIGURES, Inputs, Missing, arm_colors, claim_figures, render
from .frames import ARM
from .leaderboards import Board, leaderboard, styled

TEMPLATES = Path(__file__).parent / "templates"


def build_report(sweep_dir: str | Path, gzip_csv: bool = False) -> Path:
    """Write <sweep_dir>/report.html and <sweep_dir>/results.csv (results.csv.gz with
    `gzip_csv`, or when the directory holds only that saved table); return the report's path.

    Raises ValueError when `sweep_dir` does not exist or holds no results and no
    multirun.yaml (not a sweep)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"{root} does not exist or is not a directory")
    problems: list[str] = []
    frame = load.load_rows(root, problems)
    for problem in problems:  # the rest of the report goes on; the bad line is named
        print(f"moe_bench.report: warning: {problem}", file=sys.stderr)
    jobs = load.job_table(root, frame, problems)
    data = load.data_file(root, gzip_csv)
    env = results.load_env(root)
    html = render_template(
        "report.html.j2", {**context(root, frame, env, jobs, problems), "data_file": data}
    )
    load.write_table(root / data, frame)
    path = root / "report.html"
    results.atomic_write(path, html)
    return path


@functools.cache
def _templates() -> jinja2.Environment:
    """One environment per process: it compiles each template once (its loader still reloads
    a template whose file changed)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_template(name: str, context: dict[str, Any]) -> str:
    return _templates().get_template(name).render(**context)


def _figures(inputs: Inputs, found: list) -> tuple[list[dict], list[dict]]:
    drawn, missing = [], []
    for spec in [*FIGURES, *SCALE_FIGURES, *claim_figures(found)]:
        try:
            svg, data = render(spec, inputs)
            drawn.append(
                {"key": spec.key, "title": spec.title, "caption": spec.caption, "svg": svg,
                 "table": plotted_table(data) if spec.table else None}
            )  # fmt: skip
        except Missing as why:
            missing.append({"section": spec.title, "reason": str(why)})
        except Exception as err:  # one odd figure must not cost the whole report: say why
            reason = f"could not be drawn: {type(err).__name__}: {err}"
            missing.append({"section": spec.title, "reason": reason})
    return drawn, missing


def plotted_table(data: pd.DataFrame) -> dict[str, list]:
    """A figure's plotted values as a table: one row per panel and series, one column per x."""
    wide = data.pivot_table(index=["panel", "series"], columns="x", values="y", aggfunc="first")
    columns = ["panel", "series", *(f"{x:g}" for x in wide.columns)]
    rows = [[*key, *(f"{v:.4g}" for v in values)] for key, values in wide.iterrows()]
    return {"columns": columns, "rows": rows}


class Stages(NamedTuple):
    """The stages' results for one sweep's finished jobs."""

    frame: pd.DataFrame  # rows of ok and failed jobs, each with its arm
    cards: list[load.TaskCard]  # per task, in the cards' order
    boards: dict[str, Board]  # task -> its leaderboard
    claims: list[claims.Result]  # covered claims
    inputs: Inputs  # what the figures draw from


def stages(frame: pd.DataFrame) -> Stages:
    """frames -> leaderboards -> claims -> the figures' inputs, from the used jobs' rows."""
    frame = frames.with_arms(frame)
    cards = load.task_cards(frame)
    boards = {c.task: leaderboard(c.task, frame[frame["task"] == c.task]) for c in cards}
    found = claims.evaluate(frame)
    colors = arm_colors(frames.arm_variants(frame))
    ok = frame[frame["status"] == "ok"]
    return Stages(frame, cards, boards, found, Inputs(ok, boards, colors, found))


def context(
    root: Path, frame: pd.DataFrame, env: list[dict], jobs: list[load.JobInfo], problems: list[str]
) -> dict[str, Any]:
    """Everything the page shows, stage by stage."""
    # only finished jobs' rows count: an incomplete job's last rows are not its final values
    if jobs:
        frame = frame[frame["job_dir"].isin([j.job for j in jobs if j.state in load.USED])]
    frame, cards, boards, found, inputs = stages(frame)
    ok, colors = inputs.rows, inputs.colors
    swatch = {arm: f"a-{i}" for i, arm in enumerate(colors)}
    drawn, missing = _figures(inputs, found)
    no_results = load.jobs_without_results(root)
    if no_results:
        why = "no rows (not run yet, still running, or killed before writing)"
        missing.insert(0, {"section": "Jobs " + ", ".join(no_results), "reason": why})
    for problem in problems:
        missing.insert(0, {"section": "Unreadable rows", "reason": problem})
    uncarded = load.uncarded_tasks(frame)
    if uncarded:
        why = (
            "these rows carry no run card (card.* columns, written by newer runs): no question "
            "or measure text, no summary answers; tasks are in name order"
        )
        missing.insert(0, {"section": "Run card of " + ", ".join(uncarded), "reason": why})
    states = pd.Series([j.state for j in jobs], dtype=object).value_counts()
    identical = sections.identical_balance(ok)
    notes = load.variant_notes(frame)
    variants = sorted(set(frames.arm_variants(frame).values()))
    spec = sections.specialisation(ok)
    ran = sections.what_ran(ok)
    checks = invariance.invariance_table(ok)
    return {
        "name": root.resolve().name,
        "sweep": shown_path(root),
        "built": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "summary": {
            "jobs": len(jobs),
            "ok": int(states.get("ok", 0)),
            "failed": int(states.get("failed", 0)),
            "others": {
                state: int(states[state])
                for state in ("running", load.INCOMPLETE, load.UNREADABLE, load.NOT_STARTED)
                if state in states
            },
        },
        "jobs": [j._asdict() for j in jobs if j.state not in load.USED or j.detail],
        "tasks": [c.task for c in cards],
        "arms": [{"arm": a, "cls": swatch[a], "color": colors[a]} for a in colors],
        "swatch": swatch,
        "run": load.run_card(root, frame, env),
        "missing": missing,
        "failed": load.failed_jobs(frame),
        "leaderboards": [
            {
                "board": boards[c.task],
                "table": styled(boards[c.task], swatch),
                "measure": c.measure,
                "asks": c.ask,
                "identical": identical.get(c.task, []),
                "marked": bool((boards[c.task].marks != "").to_numpy().any()),
                "sequential": frames.sequential_timing(frame[frame["task"] == c.task]),
            }
            for c in cards
        ],
        "figures": drawn,
        "notes": [{"variant": v, "note": notes.get(v)} for v in variants],
        "non_causal": frames.non_causal(frame),
        "findings": sections.findings(frame, cards, boards),
        "claims": claims.rows_for_report(found),
        "claims_rule": claims.RULE,
        "claims_gaps": claims.claim_gaps(frame) if found else [],
        "what_ran": ran.to_dict("records"),
        "what_ran_columns": list(ran.columns),
        "specialisation": [
            {ARM: arm, **{c: f"{v:.3f}" for c, v in values.items()}}
            for arm, values in spec.iterrows()
        ],
        "spec_domains": spec.attrs.get("domains", ()),
        "spec_task": spec.attrs.get("task", ""),
        "split_checks": checks.to_dict("records"),
        "split_check_columns": list(checks.columns),
        "split_check_tolerances": invariance.tolerances(ok),
    }


def shown_path(root: Path) -> str:
    """The sweep folder as the page names it: relative to the working directory when inside it
    (a committed report names its place in the repository, not the machine that built it)."""
    path = root.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
