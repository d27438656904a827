"""scripts/speed_floor.py: its arithmetic on hand-made samples, and every part runs."""

from __future__ import annotations

from scripts.speed_floor import cumulative, parts


def test_cumulative_takes_each_rounds_fastest_way_over_that_rounds_dense() -> None:
    ms = {"gemms": {"x": [5.0, 10.0, 6.0], "y": [4.0, 12.0, 5.0]}, "moves": {"": [1.0, 2.0, 1.0]}}
    rows = cumulative(ms, dense_ms=[10.0, 20.0, 10.0])
    # fastest per round: 4, 10, 5 -> 0.4, 0.5, 0.5; plus moves: 5, 12, 6 -> 0.5, 0.6, 0.6
    assert rows == [
        ("gemms", {"x": 6.0, "y": 5.0}, (0.45, 0.5, 0.5)),
        ("moves", {"": 1.0}, (0.55, 0.6, 0.6)),
    ]


def test_every_part_of_the_quick_size_runs() -> None:
    steps = parts("quick")
    assert list(steps)[:2] == ["dense", "dense GEMMs"]
    for ways in steps.values():
        for step in ways.values():
            step()
