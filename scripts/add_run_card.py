"""Add the run card to a rows file written before it: `env.*` and `card.*` columns on each
job's closing `job` row (docs/contract.md §5), from facts given on the command line.

    python scripts/add_run_card.py reports/claims/results.csv.gz \
        --cpu "AMD EPYC 7B13" --cores 2 --threads 1 --torch 2.13.0 --python 3.11.7 \
        --commit 4eace0f --date "2026-01-02 03:04:05 UTC" --texts card_texts.json

`--texts` names a JSON file: {"tasks": {TASK: {"order": 0, "ask": "...", "measure": "...",
"answers": [{"question": ..., "metric": ..., "pass": ..., "unit": ..., "words": ...}]}},
"variants": {VARIANT: "its loss note"}}. `--texts-from-code` takes the same texts from this
checkout instead: each task object's `report` (moe_bench.registry) and each variant's config
`note` (moe_bench.components), as new runs write them. Only what is given is written; columns
the rows already carry are overwritten only with --force. Writes the file in place (gzip kept, same
bytes for the same input) or to --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

ENV_FLAGS = {  # flag -> card column
    "cpu": "env.cpu",
    "gpu": "env.gpu",
    "cores": "env.cores",
    "device_memory_gib": "env.device_memory_gib",
    "threads": "env.threads",
    "torch": "env.torch",
    "cuda": "env.cuda",
    "python": "env.python",
    "platform": "env.platform",
    "commit": "env.commit",
    "date": "env.date",
}
JOB = "job"  # the closing row's metric


def card_columns(args: argparse.Namespace, texts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task ("*": every task), the card columns to set on its jobs' closing rows."""
    env = {col: getattr(args, flag) for flag, col in ENV_FLAGS.items()}
    out: dict[str, dict[str, Any]] = {"*": {k: v for k, v in env.items() if v is not None}}
    for task, text in (texts.get("tasks") or {}).items():
        unknown = set(text) - {"order", "ask", "measure", "answers"}
        if unknown:
            raise ValueError(
                f"tasks.{task} has {', '.join(sorted(unknown))}; allowed: order, ask, measure, "
                "answers"
            )
        card = {
            "card.task_order": text.get("order"),
            "card.task_ask": text.get("ask"),
            "card.task_measure": text.get("measure"),
            "card.task_answers": json.dumps(text["answers"]) if "answers" in text else None,
        }
        out[task] = {k: v for k, v in card.items() if v is not None}
    return out


def texts_from_code() -> dict[str, Any]:
    """The `--texts` content from this checkout: what each task asks, each variant's note."""
    # imported here: they load torch, which the other options do not need
    from moe_bench import components, registry

    tasks = {}
    for name in registry.names():
        card = registry.lookup(name).report.card()
        tasks[name] = {
            "order": card["card.task_order"],
            "ask": card["card.task_ask"],
            "measure": card["card.task_measure"],
            "answers": json.loads(card["card.task_answers"]),
        }
    notes = {name: components.lookup(name).config.note for name in components.names()}
    return {"tasks": tasks, "variants": notes}


def add_card(
    frame: pd.DataFrame, columns: dict[str, dict[str, Any]], notes: dict[str, str], force: bool
) -> pd.DataFrame:
    """The rows with the card columns set on every `job` row (of the named task, or all)."""
    frame = frame.copy()
    ends = frame["metric"] == JOB
    if not ends.any():
        raise ValueError("metric=job: no closing job rows in this file; allowed: a rows file")
    for task, values in columns.items():
        rows = ends if task == "*" else ends & (frame["task"] == task)
        for col, value in values.items():
            if col not in frame:
                frame[col] = None
            target = rows if force else rows & frame[col].isna()
            frame[col] = frame[col].astype(object)
            frame.loc[target, col] = value
    if notes:
        col = "card.variant_note"
        if col not in frame:
            frame[col] = None
        frame[col] = frame[col].astype(object)
        for variant, note in notes.items():
            target = ends & (frame["variant"] == variant)
            frame.loc[target if force else target & frame[col].isna(), col] = note
    return frame


def write(frame: pd.DataFrame, path: Path) -> None:
    text = frame.to_csv(index=False)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.name.endswith(".gz"):
        with gzip.GzipFile(tmp, "wb", mtime=0) as out:  # the same rows give the same bytes
            out.write(text.encode())
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/add_run_card.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("rows", type=Path, help="results.csv or results.csv.gz")
    for flag in ENV_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None)
    parser.add_argument("--texts", type=Path, help="JSON file of task and variant texts")
    parser.add_argument(
        "--texts-from-code", action="store_true", help="task and variant texts of this checkout"
    )
    parser.add_argument("--out", type=Path, help="write here instead of in place")
    parser.add_argument("--force", action="store_true", help="overwrite card values present")
    args = parser.parse_args(argv)
    try:
        if not args.rows.is_file() or not args.rows.name.endswith((".csv", ".csv.gz")):
            raise ValueError(f"rows={args.rows}: not a file; allowed: results.csv[.gz]")
        if args.texts and args.texts_from_code:
            raise ValueError("--texts and --texts-from-code: both given; allowed: one of them")
        texts = json.loads(args.texts.read_text()) if args.texts else {}
        if args.texts_from_code:
            texts = texts_from_code()
        frame = pd.read_csv(args.rows, dtype=str)  # text in, the same text out
        frame = add_card(frame, card_columns(args, texts), texts.get("variants") or {}, args.force)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    write(frame, args.out or args.rows)
    print(args.out or args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
