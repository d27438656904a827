"""The README's simulated expert-parallel tables from a `+experiment=ep_scale` sweep's rows.

    python scripts/ep_scale_table.py reports/ep_scale

Prints markdown: per routing source (task.source) and metric, one row per routing rule, one
column per rank count, cells "contiguous / eplb" (the mean over replayed steps and layers;
"n/a" where the rule cannot route at that layout).
"""

from __future__ import annotations

import argparse

import pandas as pd

from moe_bench import results

MEASURES = (
    ("sim_straggler", "value", "straggler factor (max / mean token rows a rank)", "{:.2f}"),
    ("sim_bytes_per_token", "value", "off-rank bytes per token (KB)", "{:.1f}", 1e-3),
    ("sim_a2a_us", "value", "est. dispatch + combine (us)", "{:.0f}"),
    ("sim_step_us", "compute_us", "est. expert compute, slowest rank (us)", "{:.0f}"),
)


def cell(rows: pd.DataFrame, field: str, fmt: str, scale: float) -> str:
    if rows.empty:
        return "n/a"
    values = [
        fmt.format(float(rows[rows["placement"] == p][field].mean()) * scale)
        for p in ("contiguous", "eplb")
        if (rows["placement"] == p).any()
    ]
    return " / ".join(values)


def tables(frame: pd.DataFrame) -> str:
    out = []
    frame = frame[frame["status"] == "ok"]
    for source, part in frame.groupby("task.source", sort=False):
        ranks = sorted(part["ranks"].dropna().astype(int).unique())
        rules = list(dict.fromkeys(part["rule"].dropna()))
        for metric, field, words, fmt, *scale in MEASURES:
            rows = part[part["metric"] == metric]
            out.append(f"\n{source}: {words}, contiguous / eplb\n")
            out.append("| rule | " + " | ".join(f"P={p}" for p in ranks) + " |")
            out.append("|---" * (len(ranks) + 1) + "|")
            for rule in rules:
                cells = [
                    cell(rows[(rows["rule"] == rule) & (rows["ranks"] == p)], field, fmt,
                         scale[0] if scale else 1.0)
                    for p in ranks
                ]  # fmt: skip
                out.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a +experiment=ep_scale sweep (or its saved rows)")
    print(tables(results.load(parser.parse_args().sweep_dir)))


if __name__ == "__main__":
    main()
