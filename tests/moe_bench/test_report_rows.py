"""Rows from before the current protocols: timings without a per-round ratio interval, the run
card added afterwards (scripts/add_run_card.py), and settings that repeat one another."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import variants
from moe_bench import identity, registry
from moe_bench.report import build_report, frames, leaderboards
from scripts import add_run_card

from . import report_fixtures as fx

# --- timings of the earlier, sequential protocol -------------------------------------------------


def test_timings_without_a_ratio_interval_are_said_to_predate_the_interleaved_protocol(
    tmp_path: Path, no_figures: None
) -> None:
    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "ratio_ci95"} for r in rows]

    jobs = [fx.throughput_job(v) for v in ("dense", "switch")] + [fx.memory_job("switch")]
    old = fx.frame([fx.closed(strip(j)) for j in jobs])
    assert frames.sequential_timing(old[old["task"] == "throughput"])
    assert not frames.sequential_timing(old[old["task"] == "memory"])  # not timed
    new = fx.frame([fx.closed(j) for j in jobs])
    assert not frames.sequential_timing(new[new["task"] == "throughput"])
    nulled = new.assign(ratio_ci95=None)
    assert frames.sequential_timing(nulled[nulled["task"] == "throughput"])

    html = build_report(fx.write_sweep(tmp_path / "old", [strip(j) for j in jobs])).read_text()
    part = html[html.index("<h3>throughput</h3>") :]
    part = part[: part.index("<h3>", 4) if "<h3>" in part[4:] else part.index("</section>")]
    assert "predate the interleaved protocol" in part
    assert "★" not in part.split("<table", 1)[1].split("</table>", 1)[0]  # no star from them
    assert "☆" in part  # the leader is named, its noise said to be unmeasured
    html = build_report(fx.write_sweep(tmp_path / "new", jobs)).read_text()
    assert "predate the interleaved protocol" not in html


def test_add_run_card_takes_the_texts_from_code(tmp_path: Path) -> None:
    rows = fx.frame([fx.closed(fx.throughput_job("switch"), carded=False)])
    path = tmp_path / "results.csv"
    rows.to_csv(path, index=False)
    assert add_run_card.main([str(path), "--gpu", "Some GPU", "--texts-from-code"]) == 0
    end = pd.read_csv(path).query("metric == 'job'").iloc[0]
    asks = registry.lookup("throughput").report
    assert end["card.task_ask"] == asks.ask and end["card.task_order"] == asks.order
    assert end["card.variant_note"] == variants.lookup("switch").config.note
    assert end["env.gpu"] == "Some GPU"
    both = [str(path), "--texts", str(path), "--texts-from-code"]
    assert add_run_card.main(both) == 2


def test_a_setting_that_repeats_another_is_said_once() -> None:
    arms = {
        f"{b}{e}": {"variant": "mixtral", "task": "throughput", "backend": b,
                    "variant.backend": b, "model.expansion": e}
        for b in ("grouped", "megablocks") for e in (8, 16)
    }  # fmt: skip
    labels = identity.arm_labels(arms)
    assert labels["grouped8"] == "mixtral · backend=grouped · expansion=8"
    assert len(set(labels.values())) == 4
    other = {**arms["grouped8"], "variant.backend": "megablocks"}  # varies on its own: said
    assert "variant.backend=megablocks" in identity.arm_labels({**arms, "x": other})["x"]
    rows = pd.DataFrame(
        [{"variant": "mixtral", **{k: v for k, v in a.items() if k != "variant"}}
         for a in arms.values()]
    )  # fmt: skip
    assert leaderboards._key_columns(rows) == ["backend", "model.expansion"]


def test_the_run_card_reads_back_as_written(tmp_path: Path, no_figures: None) -> None:
    rows = fx.frame([fx.closed(fx.throughput_job("switch"), carded=False)])
    path = tmp_path / "results.csv"
    rows.to_csv(path, index=False)
    argv = [str(path), "--cuda", "13.0", "--cores", "2", "--device-memory-gib", "140.4"]
    assert add_run_card.main(argv) == 0
    html = build_report(tmp_path).read_text()
    run = html[html.index('id="run"') :]
    for key, value in (("cuda", "13.0"), ("cores", "2"), ("device_memory_gib", "140.4")):
        assert f"<dt>{key}</dt><dd><code>{value}</code>" in run, key
