"""Shrink a convergence sweep's saved rows to 10-step training windows, as `task.log_every=10`
would have logged them, for committing an example (reports/claims/README.md).

    python scripts/window_training_rows.py IN.csv.gz OUT.csv.gz [--window 10]

Training rows (every step) become one row per job, metric, key columns and window of
`--window` steps: the mean of the values (tokens_per_s: window tokens over window seconds, the
harmonic mean, as `TrainLog.emit` computes it), at the window's last step and its `wall_s`.
`expert_load` rows are kept at each job's last evaluation only (the report and the claims read
no other); the other evaluation rows (`val_loss`, `val_ppl`, `max_vio_global`) and `job` rows
are kept as they are, and so are rows without a step (a mixed sweep's other tasks). With steps
a multiple of the window, the mean over a job's training rows is unchanged. The rows then say
what they are: `task.log_every` becomes the window on every training job's row (training is the
same whatever it logs, so jobs windowed this way and jobs run with that `log_every` are one
arm). Windowing rows already windowed at the same size changes nothing else.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

TRAINING = (
    "train_loss", "aux_loss", "tokens_per_s", "load_entropy", "max_vio_batch",
    "drop_fraction", "experts_per_token",
)  # fmt: skip
KEYS = ("layer", "loss", "pass", "domain", "expert")


def windowed(rows: pd.DataFrame, window: int) -> pd.DataFrame:
    # a sweep's other tasks (throughput, balance, ...) log these names without a step: kept
    stepped = rows["step"].notna()
    train = rows[rows["metric"].isin(TRAINING) & stepped].copy()
    train["_window"] = (train["step"] - 1) // window
    keys = ["job_dir", "metric", *[k for k in KEYS if k in train], "_window"]
    out = []
    for _, part in train.groupby(keys, dropna=False, sort=False):
        last = part.loc[part["step"].idxmax()].copy()
        values = part["value"]
        if last["metric"] == "tokens_per_s":
            last["value"] = len(values) / sum(1 / v for v in values if v > 0 and math.isfinite(v))
        else:
            last["value"] = values.mean()
        out.append(last)
    kept = rows[~(rows["metric"].isin(TRAINING) & stepped)]
    load = (kept["metric"] == "expert_load") & kept["step"].notna()
    last = kept["step"].where(load).groupby(kept["job_dir"]).transform("max")
    kept = kept[~load | (kept["step"] == last)]
    out = pd.concat([kept, pd.DataFrame(out).drop(columns="_window")], ignore_index=True)
    if "task.log_every" in out:  # the training jobs' rows (other tasks have no log_every)
        out.loc[out["task.log_every"].notna(), "task.log_every"] = window
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    rows = pd.read_csv(args.src, low_memory=False)
    windowed(rows, args.window).to_csv(args.dst, index=False, compression="gzip")


if __name__ == "__main__":
    main()
