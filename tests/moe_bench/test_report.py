"""The HTML report: built from synthetic sweeps (report_fixtures), checked as a user sees it."""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import sys
from pathlib import Path

import markupsafe
import matplotlib.image
import pandas as pd
import pytest

from moe_bench import results, schema
from moe_bench.report import build_report, compare, figures, frames, leaderboards, load, sections
from moe_bench.report.__main__ import main

from . import headless_chromium
from . import report_fixtures as fx
from .conftest import sketch_figures

ALL_FIGURES = {spec.key for spec in figures.FIGURES}


def full_jobs() -> list[list[dict]]:
    """Every task, three variants, two seeds, a small size grid, and one failed job."""
    jobs = []
    for variant in ("dense", "switch", "gshard"):
        for seed in (0, 1):
            for tokens in (256, 1024):
                for experts in (4, 8):
                    jobs.append(fx.throughput_job(variant, seed, tokens, experts))
            jobs.append(fx.memory_job(variant, seed))
            jobs.append(fx.convergence_job(variant, seed))
    for max_devices in (1, 2):
        jobs.append(fx.expert_parallel_job("switch", **{"variant.max_devices": max_devices}))
    jobs.append(fx.expert_parallel_job("gshard"))
    jobs.append(fx.failed_job("switch", "memory", "Traceback:\n  ...\nRuntimeError: out of memory"))
    return jobs


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full sweep's page, every figure laid out and saved as SVG (seconds): the slow run's."""
    sweep = fx.write_sweep(tmp_path_factory.mktemp("full"), full_jobs())
    return build_report(sweep)


@pytest.fixture(scope="module")
def full_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full sweep's page with every figure drawn but sketched (`sketch_figures`)."""
    with pytest.MonkeyPatch.context() as patch:
        sketch_figures(patch)
        return build_report(fx.write_sweep(tmp_path_factory.mktemp("sketched"), full_jobs()))


def figure_ids(html: str) -> set[str]:
    return set(re.findall(r'<figure id="([^"]+)"', html))


def test_full_sweep_draws_every_figure(full_page: Path) -> None:
    html = full_page.read_text()
    # switch without a capacity factor against dense covers claim 1c: its own figure
    assert figure_ids(html) == ALL_FIGURES | {"claim-1c-0"}
    assert html.count("<svg") == len(ALL_FIGURES) + 1
    assert "could not be drawn" not in html
    for task in ("throughput", "memory", "convergence", "expert_parallel"):
        assert f"<h3>{task}</h3>" in html


def test_results_csv_holds_every_row(full_page: Path) -> None:
    rows = sum(len(fx.closed(job)) for job in full_jobs())
    table = pd.read_csv(full_page.parent / "results.csv")
    assert len(table) == rows
    assert {"variant", "metric", "value", "status", "job_dir"} <= set(table.columns)


def assert_self_contained(html: str) -> None:
    assert "could not be drawn" not in html and 'class="sketch"' not in html
    assert not re.search(r"<(link|script|iframe|img)\b", html)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    # only in-page anchors, inline images and the tidy data beside the report
    links = set(re.findall(r'href="([^"#][^"]*)"', html))
    assert {link for link in links if not link.startswith("data:")} == {"results.csv"}
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "inline SVGs must not share element ids"
    for anchor in re.findall(r'(?:href="|url\()#([^")]+)', html):
        assert anchor in ids, f"dangling reference #{anchor}"


@pytest.mark.slow  # every figure laid out and saved as SVG, seconds: the slow run
def test_full_sweep_as_svg_is_self_contained(full_report: Path) -> None:
    html = full_report.read_text()
    assert figure_ids(html) == ALL_FIGURES | {"claim-1c-0"}
    assert html.count("<svg") == len(ALL_FIGURES) + 1
    assert_self_contained(html)


def test_failed_job_is_listed_with_its_error(tmp_path: Path, no_figures: None) -> None:
    error = 'Traceback (most recent call last):\n  File "x.py"\nValueError: top_k=9 <= 8 & <b>'
    jobs = [fx.throughput_job("switch"), fx.failed_job("gshard", "throughput", error)]
    html = build_report(fx.write_sweep(tmp_path, jobs)).read_text()
    failed = html[html.index('<section id="failed">') : html.index('<section id="leaderboards">')]
    assert "ValueError: top_k=9 &lt;= 8 &amp; &lt;b&gt;" in failed  # last line, escaped
    assert "Traceback (most recent call last)" in failed  # the full text, folded
    assert "<td><code>1</code></td>" in failed  # its job directory
    assert "1 failed" in html
    board = leaderboards.leaderboard("throughput", fx.frame(jobs))
    gshard = board.shown[board.shown["arm"] == "gshard"].iloc[0]
    assert gshard["runs"] == "1 (1 failed)"


def test_single_job_sweep_says_what_is_missing(tmp_path: Path, sketched_figures: None) -> None:
    html = build_report(fx.write_sweep(tmp_path, [fx.convergence_job("switch")])).read_text()
    assert figure_ids(html) == {
        "speed", "quality-cost", "loss-step", "loss-wall", "dynamics", "maxvio", "load-layers",
        "load-steps", "load-domains",
    }  # fmt: skip
    missing = html[html.index('id="missing"') : html.index('<section id="run">')]
    assert "no tflops rows" in missing
    assert "no peak_memory_bytes column in any leaderboard" in missing
    assert "★" not in html  # one row per column: nothing to be best against


def test_throughput_only_sweep(tmp_path: Path) -> None:
    """Its figures are real SVG (the full sweep's, every figure, are in the slow run)."""
    jobs = [fx.throughput_job(v, tokens=t) for v in ("dense", "switch") for t in (256, 512)]
    html = build_report(fx.write_sweep(tmp_path, jobs)).read_text()
    assert figure_ids(html) == {"throughput-tokens", "speed", "efficiency"}
    assert html.count("<svg") == 3
    assert_self_contained(html)
    missing = html[html.index('id="missing"') : html.index('<section id="run">')]
    assert "no variant ran at two or more values of number of experts" in missing
    for metric in ("train_loss", "max_vio_batch", "expert_load", "peak_memory_bytes"):
        assert f"no {metric}" in missing


def test_started_sweep_without_results_lists_its_jobs(
    tmp_path: Path, sketched_figures: None
) -> None:
    fx.write_sweep(tmp_path, [fx.throughput_job("switch"), fx.throughput_job("gshard")])
    for job in ("0", "1"):
        (tmp_path / job / "results.jsonl").unlink()
    html = build_report(tmp_path).read_text()
    assert "Jobs 0, 1" in html and "no rows (not run yet" in html
    assert figure_ids(html) == set()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda root: root / "absent", id="missing-dir"),
        pytest.param(lambda root: root, id="empty-dir"),
        pytest.param(lambda root: (root / "notes.txt").write_text("x") and root, id="no-results"),
    ],
)
def test_not_a_sweep_is_one_clear_error(tmp_path: Path, make, capsys) -> None:
    assert main([str(make(tmp_path))]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error:" in err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_command_line_prints_the_report_path(tmp_path: Path) -> None:
    sweep = fx.write_sweep(tmp_path, [fx.memory_job("dense"), fx.memory_job("switch")])
    done = subprocess.run(
        [sys.executable, "-m", "moe_bench.report", str(sweep)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sweep / "report.html")
    assert (sweep / "results.csv").is_file()
    leftovers = [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [], "atomic writes leave no temp files"


def test_leaderboard_pools_seeds_and_marks_the_best(tmp_path: Path) -> None:
    jobs = [fx.convergence_job(v, seed) for v in ("dense", "switch", "gshard") for seed in (0, 1)]
    rows = fx.frame(jobs)
    board = leaderboards.leaderboard("convergence", rows)
    loss = "final val loss [nats] ↓"
    # the expected spread, straight from the rows: each job's last val_loss, over seeds
    val = rows[rows["metric"] == "val_loss"]
    final = val[val["step"] == val.groupby("job_dir")["step"].transform("max")]
    stats = final.groupby("variant")["value"].agg(["mean", "std"])
    best_variant = stats["mean"].idxmin()
    for _, line in board.shown.iterrows():
        mean, std = stats.loc[line["arm"]]
        assert line[loss].startswith(f"{mean:,.3f} ± {std:,.3f}")
    marked = board.shown.loc[board.best[loss], "arm"].tolist()
    assert marked == [best_variant]
    assert board.shown.loc[board.best[loss], loss].item().endswith("★")


def test_leaderboard_separates_swept_settings(tmp_path: Path) -> None:
    jobs = [fx.throughput_job(v, tokens=t) for v in ("dense", "switch") for t in (256, 1024)]
    board = leaderboards.leaderboard("throughput", fx.frame(jobs))
    assert board.ties == ["model.tokens"]
    assert len(board.shown) == 4
    fwd = "tokens/s fwd [tok/s] ↑"
    # one best per token count: the faster variant at that size
    assert board.best[fwd].sum() == 2
    assert set(board.table.loc[board.best[fwd], "variant"]) == {"dense"}
    # each row is one arm, labelled by the setting that tells it apart from its variant's others
    assert set(board.shown["arm"]) == {
        f"{v} · tokens={t}" for v in ("dense", "switch") for t in (256, 1024)
    }


def test_expert_parallel_table_and_figures(tmp_path: Path, sketched_figures: None) -> None:
    jobs = [fx.expert_parallel_job("switch", **{"variant.max_devices": m}) for m in (1, 2)]
    board = leaderboards.leaderboard("expert_parallel", fx.frame(jobs))
    shown = board.shown
    assert len(shown) == 2 and "variant.max_devices" in shown.columns  # one row per setting
    for label in ("devices/token", "bytes/token", "remote fraction", "rank imbalance"):
        assert any(c.startswith(label) for c in shown.columns), label
    # the table's imbalance is the eval forward's, not the last training step's
    imbalance = next(c for c in shown.columns if c.startswith("rank imbalance"))
    assert {cell.split()[0] for cell in shown[imbalance]} == {"1.100"}
    html = build_report(fx.write_sweep(tmp_path, jobs)).read_text()
    assert {"ep-traffic", "ep-rank-tokens", "ep-imbalance"} <= figure_ids(html)
    assert "could not be drawn" not in html


def test_balance_columns_leave_out_single_expert_layers() -> None:
    routed = fx.base("switch", "balance", **{"variant.num_experts": 8})
    single = {**fx.base("dense", "balance"), "variant.num_experts": 1}
    jobs = [[fx.row(common, "max_vio_global", 0.5)] for common in (routed, single)]
    board = leaderboards.leaderboard("balance", fx.frame(jobs))
    assert board.shown["arm"].tolist() == ["switch"]  # dense's 0.0 is no balance at all
    alone = leaderboards.leaderboard("balance", fx.frame(jobs[1:]))
    assert alone.shown.empty


def test_notes_give_loss_normalisation_and_flag_expert_choice(
    tmp_path: Path, no_figures: None
) -> None:
    jobs = [fx.convergence_job("switch"), fx.convergence_job("mixtral")]
    leaky = [{**r, "leaks_future_tokens": True} for r in fx.convergence_job("expert_choice")]
    jobs.append(leaky)
    html = build_report(fx.write_sweep(tmp_path, jobs)).read_text()
    notes = html[html.index('<section id="notes">') :]
    for variant in ("switch", "mixtral", "expert_choice"):
        assert str(markupsafe.escape(fx.VARIANT_NOTES[variant])) in notes
    assert "⚠ non-causal" in notes
    assert "expert_choice  ⚠ non-causal" in html  # flagged in the leaderboard row too


@pytest.mark.parametrize(
    ("recorded", "flagged"),
    [(True, True), (False, False), ("true", True), (None, False)],  # None: not known to leak
)
def test_non_causal_flag_follows_each_jobs_recorded_leak(recorded: object, flagged: bool) -> None:
    """The runner's `leaks_future_tokens` column decides (expert_choice with
    selection_scope=position is causal); the report never guesses from a variant's name."""
    rows = [{**r, "leaks_future_tokens": recorded} for r in fx.convergence_job("expert_choice")]
    frame = fx.frame([rows, fx.convergence_job("switch")])
    assert frames.non_causal(frame) == (["expert_choice"] if flagged else [])
    board = leaderboards.leaderboard("convergence", frame)
    assert ("expert_choice  ⚠ non-causal" in board.shown["arm"].tolist()) is flagged
    assert "switch" in board.shown["arm"].tolist()


def test_arm_colours_are_distinct_and_family_shaded() -> None:
    arms = {"dense": "dense", "switch · dropless": "switch", "switch · capacity_factor=1": "switch"}
    colors = figures.arm_colors(arms)
    assert set(colors) == set(arms) and len(set(colors.values())) == len(colors)
    assert figures.arm_colors(arms) == colors  # the same arms, the same colours
    alone = figures.arm_colors({"dense": "dense", "switch": "switch"})
    assert alone["dense"] == colors["dense"]  # a variant's hue does not depend on its arms


def assert_opens_cleanly(report: Path, profile: Path) -> None:
    """Open the report from file:// in headless Chromium: no failed or outside requests and a
    screenshot that shows something."""
    if headless_chromium.executable() is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium); page not opened")
    url = report.resolve().as_uri()
    page = headless_chromium.open_page(url, profile)
    assert page.failed == []
    assert {u for u in page.requested if not u.startswith("data:")} == {url}
    assert page.screenshot_png.startswith(b"\x89PNG")
    pixels = matplotlib.image.imread(io.BytesIO(page.screenshot_png), format="png")
    assert pixels.shape[1] == 1280 and pixels.shape[0] > 1000
    assert pixels.std() > 0.05, "the screenshot is blank"


@pytest.mark.slow  # a browser process per page: the slow run
def test_report_opens_in_headless_chromium(full_report: Path, tmp_path: Path) -> None:
    assert_opens_cleanly(full_report, tmp_path / "profile")


@pytest.mark.slow  # a browser process per page: the slow run
def test_committed_example_opens_in_headless_chromium(tmp_path: Path) -> None:
    # reports/example: the report of a real `+experiment=quick` sweep, linked from the README
    example = Path(__file__).parents[2] / "reports" / "example" / "report.html"
    assert example.is_file(), "reports/example/report.html is missing"
    assert_opens_cleanly(example, tmp_path / "profile")


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_real_multirun_ends_with_a_report_that_opens(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "moe_bench",
        "-m",
        "variant=switch,gshard",
        "task=balance",
        "model=tiny",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = sweep / "report.html"
    assert f"report: {report}" in done.stdout  # built by the Hydra callback
    html = report.read_text()
    assert "<h3>balance</h3>" in html and "could not be drawn" not in html
    assert_opens_cleanly(report, tmp_path / "profile")


# --- one answer per question, noise-aware marks, what ran, compare, compressed CSV ---

FWD_BWD = "tokens/s fwd+bwd [tok/s] ↑"
RATIO = "ratio to dense fwd+bwd [×] ↓"


def marks_of(board: leaderboards.Board, label: str) -> dict[str, str]:
    return dict(zip(board.shown["arm"], board.marks[label]))


def test_throughput_board_ranks_by_tokens_and_says_where_ratio_disagrees() -> None:
    # switch is fastest but its dense twin is faster still: the ratio ranks it behind gshard
    jobs = [
        fx.throughput_job("switch", speed=3e5, ratio=1.6),
        fx.throughput_job("gshard", speed=2e5, ratio=1.2),
        fx.throughput_job("mixtral", speed=1e5, ratio=2.0),
    ]
    board = leaderboards.leaderboard("throughput", fx.frame(jobs))
    assert board.shown["arm"].tolist() == ["switch", "gshard", "mixtral"]  # by tokens/s
    ranks = dict(zip(board.shown["arm"], board.shown["ranks"]))
    assert ranks == {
        "switch": "ratio ranks it #2, tokens/s #1",
        "gshard": "ratio ranks it #1, tokens/s #2",
        "mixtral": "same rank",
    }
    assert not board.shown[RATIO].str.contains("★").any()  # shown beside, never ranked
    assert marks_of(board, FWD_BWD)["switch"] == "best"


def test_no_star_on_a_tie() -> None:
    # timing spread: 1% apart with 5% IQRs is a tie; 2x apart with 2% IQRs is not
    close = [
        fx.throughput_job("switch", speed=1.01e5, iqr=0.05),
        fx.throughput_job("gshard", speed=1.00e5, iqr=0.05),
    ]
    board = leaderboards.leaderboard("throughput", fx.frame(close))
    assert marks_of(board, FWD_BWD) == {"switch": "tie", "gshard": "tie"}
    assert "★" not in "".join(board.shown[FWD_BWD]) and "(tie)" in board.shown[FWD_BWD].iloc[0]
    apart = [fx.throughput_job("switch", speed=2e5), fx.throughput_job("gshard", speed=1e5)]
    assert (
        marks_of(leaderboards.leaderboard("throughput", fx.frame(apart)), FWD_BWD)["switch"]
        == "best"
    )
    # seed spread: means 0.01 apart, std 0.05 over two seeds each: Welch's t interval holds 0
    jobs = []
    for variant, shift in (("switch", 0.0), ("gshard", 0.01)):
        for seed, noise in ((0, -0.05), (1, 0.05)):
            common = fx.base(variant, "convergence", seed)
            jobs.append([fx.row(common, "val_loss", 2.0 + shift + noise, step=10)])
    board = leaderboards.leaderboard("convergence", fx.frame(jobs))
    assert set(marks_of(board, "final val loss [nats] ↓").values()) == {"tie"}
    # one seed, equal as printed (a committed report's deepseek_v3 vs dense 2.3691): a tie, no star
    same = [
        [fx.row(fx.base(v, "convergence"), "val_loss", 2.3691 + d, step=10)]
        for v, d in (("dense", 0.0), ("switch", 1e-6))
    ]
    board = leaderboards.leaderboard("convergence", fx.frame(same))
    assert set(marks_of(board, "final val loss [nats] ↓").values()) == {"tie"}


def test_noisy_rows_are_shown_and_never_starred() -> None:
    jobs = [
        fx.throughput_job("switch", speed=3e5, noisy=True),
        fx.throughput_job("gshard", speed=2e5, noisy=False),
        fx.throughput_job("mixtral", speed=1e5, noisy=False),
    ]
    board = leaderboards.leaderboard("throughput", fx.frame(jobs))
    marks = marks_of(board, FWD_BWD)
    assert marks["switch"] == "" and marks["gshard"] == "best"
    runs = dict(zip(board.shown["arm"], board.shown["runs"]))
    assert runs["switch"] == "1 (1 noisy)"


def finished(rows: list[dict]) -> list[dict]:
    """A job that ended: its `job` row, as the Recorder's finish writes it."""
    common = {k: rows[0][k] for k in ("variant", "task", "seed", "backend", "device", "dtype")}
    card = fx.card(common["task"], common["variant"])
    return [*rows, {**common, **schema.row(schema.JOB, 12.0), **card}]


def test_incomplete_and_failed_jobs_are_not_ranked() -> None:
    jobs = [
        fx.throughput_job("switch", speed=9e5),  # no `job` row: killed or still running
        finished(fx.throughput_job("gshard", speed=2e5)),
        finished(fx.throughput_job("mixtral", speed=1e5)),
        [{**r, "status": "failed", "error": "boom"} for r in fx.throughput_job("dense", speed=8e5)],
    ]
    board = leaderboards.leaderboard("throughput", fx.frame(jobs))
    marks = marks_of(board, FWD_BWD)
    assert marks["switch"] == "" and marks["gshard"] == "best" and marks["dense"] == ""
    runs = dict(zip(board.shown["arm"], board.shown["runs"]))
    assert runs["switch"] == "1 (1 incomplete)" and runs["dense"] == "1 (1 failed)"
    rows = fx.frame(jobs)
    summary = sections.findings(rows, load.task_cards(rows))
    assert summary[0].startswith("Fastest: gshard")


def test_notes_only_for_variants_present(tmp_path: Path, no_figures: None) -> None:
    html = build_report(fx.write_sweep(tmp_path, [fx.convergence_job("switch")])).read_text()
    notes = html[html.index('<section id="notes">') :]
    assert "Expert choice (Zhou" not in notes and "non-causal" not in notes
    assert str(markupsafe.escape(fx.VARIANT_NOTES["switch"])) in notes
    assert str(markupsafe.escape(fx.VARIANT_NOTES["gshard"])) not in notes


def test_summary_what_ran_and_sections_come_first(full_page: Path) -> None:
    html = full_page.read_text()
    order = [html.index(f'<section id="{s}">') for s in ("findings", "what-ran", "run")]
    assert order == sorted(order)
    findings = html[order[0] : order[1]]
    assert "Fastest: dense" in findings and "beyond the noise" in findings
    assert "Best quality:" in findings
    ran = html[order[1] : order[2]]
    for heading in ("E (experts)", "K (top-k)", "params total", "FLOPs / token", "coefficient"):
        assert heading in ran
    for task, words in (("throughput", "dense FFN with the same active FLOPs"),):
        assert words in html[html.index(f"<h3>{task}</h3>") :]
    assert "Throughput by variant" not in html  # figures are titled by their task
    assert "Tokens/s by arm" in html  # one panel per task: the chart never mixes them


def test_identical_untrained_routers_are_named() -> None:
    jobs = []
    for variant in ("deepseek_moe", "mixtral", "switch"):
        common = fx.base(variant, "balance", **{"variant.num_experts": 8})
        value = 0.7 if variant == "switch" else 0.4
        jobs.append([fx.row(common, "max_vio_global", value, layer=0, domain="prose")])
    assert sections.identical_balance(fx.frame(jobs)) == {"balance": [["deepseek_moe", "mixtral"]]}


def test_specialisation_is_a_jensen_shannon_number() -> None:
    common = fx.base("switch", "convergence", **{"variant.num_experts": 2})
    same = [
        fx.row(common, "expert_load", 0.5, step=1, layer=0, domain=d, expert=e)
        for d in fx.DOMAINS
        for e in (0, 1)
    ]
    apart = [
        fx.row(common, "expert_load", float(e == i), step=1, layer=1, domain=d, expert=e)
        for i, d in enumerate(fx.DOMAINS)
        for e in (0, 1)
    ]
    table = sections.specialisation(fx.frame([same + apart]))
    assert table.loc["switch", "layer 0"] == pytest.approx(0.0)
    assert table.loc["switch", "layer 1"] == pytest.approx(1.0)  # disjoint experts: 1 bit
    assert table.loc["switch", "mean"] == pytest.approx(0.5)


def test_compare_matches_jobs_by_config_and_flags_changes_beyond_noise(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = [fx.throughput_job("switch", tokens=t, seed=0, speed=1e5) for t in (512, 1024)]
    cand = [
        fx.throughput_job("switch", tokens=512, seed=1, speed=1.5e5),  # other seed, same config
        fx.throughput_job("switch", tokens=1024, seed=1, speed=1.002e5),
        fx.throughput_job("switch", tokens=2048, speed=9e5),  # no match in the baseline
    ]
    table = compare.compare_frames([fx.frame(base), fx.frame(cand)], ["base", "cand"])
    speed = table[table["metric"] == FWD_BWD].set_index("model.tokens")
    assert set(speed.index) == {"512", "1024"}
    assert speed.loc["512", "Δ cand"] == "+50.0% better"
    assert speed.loc["1024", "Δ cand"] == "+0.2% ~"
    a = fx.write_sweep(tmp_path / "a", base)
    b = fx.write_sweep(tmp_path / "b", cand)
    # the command line's own code, in this process (test_command_line_prints_the_report_path
    # runs `python -m moe_bench.report` itself in the slow run)
    assert main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "+50.0% better" in out
    assert out.strip().splitlines()[-1] == str(b / "compare.html")
    assert "+50.0% better" in (b / "compare.html").read_text()


def test_compressed_csv_is_read(tmp_path: Path, no_figures: None) -> None:
    sweep = fx.write_sweep(
        tmp_path / "sweep", [fx.convergence_job("switch"), fx.memory_job("dense")]
    )
    build_report(sweep)
    rows = results.load(sweep)
    saved = tmp_path / "example"
    saved.mkdir()
    with gzip.open(saved / "results.csv.gz", "wt") as out:
        out.write((sweep / "results.csv").read_text())
    again = results.load(saved)
    assert len(again) == len(rows) and set(again.columns) == set(rows.columns)
    layers = set(again["layer"].dropna())
    assert layers == {0, 1, "mean"}  # integers back, "mean" kept
    assert results.load(saved / "results.csv.gz").shape == again.shape
    html = build_report(saved).read_text()
    assert "<h3>convergence</h3>" in html
