"""task=convergence: the rows it writes, divergence as a failed job, reproducibility, data errors.

Tiny LMs on the embedded corpus (a couple of seconds each on one thread).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from moe_bench import __main__ as app
from moe_bench import results
from moe_bench.tasks import convergence
from tests.slow_cases import some_slow

from .conftest import FAST

TINY = [
    *FAST,
    "task=convergence",
    "task.n_layers=2",
    "task.seq_len=32",
    "task.batch_size=8",
    "task.warmup_steps=5",
    "task.lr=3e-3",
]


def run_job(compose_cfg, tmp_path: Path, *overrides: str) -> tuple[str, list[dict]]:
    status = app.execute(compose_cfg(*TINY, *overrides), tmp_path, "test")
    rows, _ = results.read_rows(tmp_path)
    return status, rows


# a routed layer in the default run; dense and deepseek_v3 (the bias state) in the slow run
@pytest.mark.parametrize(
    "variant", some_slow(["dense", "switch", "deepseek_v3"], ["dense", "deepseek_v3"])
)
def test_writes_step_layer_eval_and_domain_rows(compose_cfg, tmp_path: Path, variant: str) -> None:
    status, rows = run_job(
        compose_cfg, tmp_path, f"variant={variant}", "task.steps=30", "task.eval_every=15"
    )
    assert status == "ok"
    metrics = {r["metric"] for r in rows}
    assert {"train_loss", "aux_loss", "tokens_per_s", "load_entropy", "max_vio_batch"} <= metrics
    assert {"drop_fraction", "val_loss", "val_ppl", "max_vio_global", "expert_load"} <= metrics
    train = [r for r in rows if r["metric"] == "train_loss"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(r["wall_s"] > 0 for r in train)
    val = [r["value"] for r in rows if r["metric"] == "val_loss"]
    assert [r["step"] for r in rows if r["metric"] == "val_loss"] == [0, 15, 30]
    assert val[-1] < val[0] - 0.5  # it learns
    layers = {r["layer"] for r in rows if r["metric"] == "max_vio_global"}
    assert layers == {0, 1, "mean"}
    shares = [r for r in rows if r["metric"] == "expert_load" and r["step"] == 30]
    assert {r["domain"] for r in shares} == {"prose", "code"}
    for layer in (0, 1):
        for domain in ("prose", "code"):
            total = sum(r["value"] for r in shares if (r["layer"], r["domain"]) == (layer, domain))
            assert total == pytest.approx(1.0)
    assert all(r["value"] > 0 for r in rows if r["metric"] == "tokens_per_s")
    assert results.completed(tmp_path)


def test_same_seed_same_losses_over_20_steps(compose_cfg, tmp_path: Path) -> None:
    losses = []
    for run in ("a", "b"):
        _, rows = run_job(
            compose_cfg, tmp_path / run, "variant=gshard", "task.steps=20", "task.eval_every=20"
        )
        losses.append([r["value"] for r in rows if r["metric"] in ("train_loss", "aux_loss")])
    assert len(losses[0]) >= 40
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_non_finite_loss_fails_the_job_naming_the_step(compose_cfg, tmp_path: Path) -> None:
    status, rows = run_job(
        compose_cfg,
        tmp_path,
        "variant=switch",
        "task.steps=20",
        "task.lr=1e30",
        "task.warmup_steps=0",
        "task.grad_clip=1e30",
    )
    assert status == "failed"
    job = rows[-1]
    assert job["status"] == "failed"
    assert "non-finite loss at step" in job["error"] and "layer 0:" in job["error"]
    assert not results.completed(tmp_path)


def test_missing_user_data_is_a_clear_error(compose_cfg, tmp_path: Path) -> None:
    status, rows = run_job(
        compose_cfg, tmp_path, "variant=switch", "data.source=path", "data.path=/no/such/dir"
    )
    assert status == "failed"
    assert "data.path='/no/such/dir'" in rows[-1]["error"]


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = [convergence.lr_factor(s, warmup_steps=10, steps=110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert f[-1] == pytest.approx(convergence.MIN_LR_RATIO, abs=1e-3)


def test_micro_batches_accumulate_into_one_step(compose_cfg, tmp_path: Path) -> None:
    """batch 8 in micro-batches of 2: the same first-step loss as one batch of 8 (gradient
    accumulation changes how the step is computed, not its data), and a global-batch balance
    scope trains."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    common = [*TINY, "variant=mixtral", "task.steps=2", "task.eval_every=2"]
    assert app.execute(compose_cfg(*common), one, "one") == "ok"
    assert app.execute(compose_cfg(*common, "task.micro_batch_size=2"), two, "two") == "ok"
    loss = {k: results.load(p).query("metric == 'train_loss' and step == 1").value.iloc[0]
            for k, p in (("one", one), ("two", two))}  # fmt: skip
    assert loss["one"] == pytest.approx(loss["two"], rel=1e-5)
    scoped = tmp_path / "scoped"
    cfg = compose_cfg(*common, "task.micro_batch_size=2", "variant.balance_scope=global_batch")
    assert app.execute(cfg, scoped, "scoped") == "ok"


@pytest.mark.parametrize("variant", ["topp", "moe_plus_plus"])
def test_variable_k_variants_report_experts_per_token(compose_cfg, tmp_path, variant) -> None:
    cfg = compose_cfg(*TINY, f"variant={variant}", "task.steps=2")
    assert app.execute(cfg, tmp_path, variant) == "ok"
    frame = results.load(tmp_path)
    k = frame[frame.metric == "experts_per_token"]
    assert len(k) and (k.value > 0).all() and set(k.layer.astype(str)) >= {"0", "mean"}


@pytest.mark.slow  # six short training runs: the slow run
@pytest.mark.parametrize(
    "variant", ["qwen3_moe", "qwen3_next", "olmoe", "phimoe", "gpt_oss", "llama4"]
)
def test_released_model_presets_train(compose_cfg, tmp_path: Path, variant: str) -> None:
    """Each released model's preset (its E, K and shared experts) trains in the tiny LM:
    the job ends ok and the validation loss falls within 10 steps."""
    status, rows = run_job(
        compose_cfg, tmp_path, f"variant={variant}", "task.steps=10", "task.eval_every=10"
    )
    assert status == "ok", [r.get("error") for r in rows if r.get("error")][:1]
    val = [r["value"] for r in rows if r["metric"] == "val_loss"]
    assert len(val) == 2 and val[1] < val[0]
