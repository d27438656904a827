"""The scripts that upgrade committed rows: the run card's texts from this checkout's code,
and 10-step training windows that say they are `task.log_every=10` rows."""

from __future__ import annotations

import json

import pandas as pd

from moe_bench import components, registry
from scripts import add_run_card, window_training_rows


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
