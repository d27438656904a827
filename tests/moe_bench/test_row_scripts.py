"""The scripts that upgrade committed rows: the run card's texts from this checkout's code,
10-step training windows that say they are `task.log_every=10` rows, and the join of several
sweeps' rows with their job folders kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from moe_bench import components, registry
from scripts import add_run_card, join_rows, window_training_rows


def test_texts_from_code_are_what_a_job_writes() -> None:
    texts = add_run_card.texts_from_code()
    assert set(texts["tasks"]) == set(registry.names())
    for name, text in texts["tasks"].items():
        card = registry.lookup(name).report.card()
        assert text["ask"] == card["card.task_ask"] and text["order"] == card["card.task_order"]
        assert json.dumps(text["answers"]) == card["card.task_answers"]
    assert texts["variants"]["switch"] == components.lookup("switch").config.note != ""
    assert set(texts["variants"]) == set(components.names())


def test_windowed_rows_say_their_log_every_and_keep_the_mean() -> None:
    steps = range(1, 21)
    rows = pd.DataFrame(
        {
            "job_dir": "0",
            "metric": "train_loss",
            "value": [float(s) for s in steps],
            "step": list(steps),
            "task.log_every": 1,
        }
    )
    out = window_training_rows.windowed(rows, 10)
    assert sorted(out["value"]) == [5.5, 15.5] and out["value"].mean() == rows["value"].mean()
    assert set(out["task.log_every"]) == {10}
    again = window_training_rows.windowed(out, 10)  # windowing windowed rows changes nothing
    assert again["value"].tolist() == out["value"].tolist()
    # a mixed sweep: another task's step-less rows of the same names are kept as they are
    other = pd.DataFrame(
        {"job_dir": "1", "metric": ["tokens_per_s", "expert_load"], "value": [7.0, 0.5],
         "step": float("nan"), "task.log_every": float("nan")}
    )  # fmt: skip
    mixed = window_training_rows.windowed(pd.concat([rows, other]), 10)
    kept = mixed[mixed["job_dir"] == "1"]
    assert sorted(kept["value"]) == [0.5, 7.0] and kept["task.log_every"].isna().all()


def test_joined_rows_keep_each_parts_jobs_apart(tmp_path: Path) -> None:
    def saved(name: str, jobs: list[str]) -> Path:
        path = tmp_path / name
        pd.DataFrame(
            {"job_dir": jobs, "metric": "job", "value": range(len(jobs)), "variant": name}
        ).to_csv(path, index=False)
        return path

    base, extra = saved("base.csv", ["0", "1"]), saved("extra.csv", ["0"])
    out = tmp_path / "joined.csv.gz"
    assert join_rows.main([str(out), str(base), f"more={extra}"]) == 0
    joined = pd.read_csv(out, dtype={"job_dir": str})
    assert joined["job_dir"].tolist() == ["0", "1", "more/0"]
    assert joined.set_index("job_dir").loc["more/0", "variant"] == "extra.csv"
    # the same job folder twice would merge two jobs' rows: refused, nothing written
    assert join_rows.main([str(tmp_path / "bad.csv"), str(base), str(extra)]) == 2
    assert not (tmp_path / "bad.csv").exists()
