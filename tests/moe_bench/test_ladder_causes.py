"""The convergence task's cause and speed options (moe_bench/causes.py): Switch's router init,
evaluation without capacity, the fused optimizer's identical losses, and their refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moe_bench import __main__ as app
from moe_bench import causes, config
from moe_bench.results import read_rows
from moe_bench.tasks import convergence
from tests.slow_cases import some_slow

from .test_convergence_task import TINY


def job(compose_cfg, *overrides: str) -> config.Job:
    return config.resolve(compose_cfg(*TINY, *overrides))


def test_router_init_scale_draws_switch_truncated_normal_and_leaves_the_rest(compose_cfg) -> None:
    plain = convergence.build_model(job(compose_cfg, "variant=switch"))
    scaled = convergence.build_model(
        job(compose_cfg, "variant=switch", "model.d_model=64", "task.router_init_scale=0.1")
    )
    wide = job(compose_cfg, "variant=switch", "model.d_model=64")
    base = convergence.build_model(wide)
    routers = causes.routers(scaled)
    assert len(routers) == 2 == len(causes.routers(plain))
    w = torch.cat([r.weight.flatten() for r in routers])
    std = math.sqrt(0.1 / 64)  # Switch Sec. 2.4: sqrt(s / fan_in), s = 0.1
    assert w.abs().max() <= 2 * std + 1e-7  # truncated at 2 std
    assert 0.7 * std < w.std() < 1.0 * std  # a normal cut at 2 std keeps 88% of its std
    default_std = torch.cat([r.weight.flatten() for r in causes.routers(base)]).std()
    assert default_std > 1.5 * w.std()  # nn.Linear's default: 1/sqrt(3 D) = sqrt(0.33 / D)
    # every other weight is the default build's: the global random stream is untouched
    for (name, a), (_, b) in zip(base.named_parameters(), scaled.named_parameters()):
        if "router" not in name:
            assert torch.equal(a, b), name


def test_dropless_evaluates_without_capacity_and_restores_it(compose_cfg) -> None:
    lm = convergence.build_model(job(compose_cfg, "variant=switch", "variant.capacity_factor=0.25"))
    idx_BS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    lm.eval()
    with torch.no_grad():
        capped = lm(idx_BS)
        with causes.dropless(lm):
            free = lm(idx_BS)
        again = lm(idx_BS)
    T = idx_BS.numel()
    assert all(rec.routing.token.numel() < T for rec in capped.layers)  # cf 0.25 drops
    assert all(rec.routing.token.numel() == T for rec in free.layers)  # top-1, none dropped
    assert [c.capacity_factor for c in causes.capacity_configs(lm)] == [0.25, 0.25]
    torch.testing.assert_close(again.logits, capped.logits)


def test_dropless_restores_capacity_after_an_error(compose_cfg) -> None:
    lm = convergence.build_model(job(compose_cfg, "variant=switch"))
    with pytest.raises(RuntimeError), causes.dropless(lm):
        raise RuntimeError("inside")
    assert [c.capacity_factor for c in causes.capacity_configs(lm)] == [1.25, 1.25]


def rows_of(compose_cfg, tmp_path: Path, *overrides: str) -> list[dict]:
    cfg = compose_cfg(*TINY, "task.steps=12", "task.eval_every=6", *overrides)
    assert app.execute(cfg, tmp_path, "test") == "ok"
    return read_job_rows(tmp_path)


def losses(rows: list[dict]) -> list[float]:
    return [r["value"] for r in rows if r["metric"] in ("train_loss", "aux_loss", "val_loss")]


@pytest.mark.slow
def test_fused_optimizer_gives_the_for_loop_losses_to_rounding(compose_cfg, tmp_path: Path) -> None:
    loop = losses(rows_of(compose_cfg, tmp_path / "a", "variant=deepseek_moe"))
    fused = losses(
        rows_of(compose_cfg, tmp_path / "b", "variant=deepseek_moe", "task.fused_optimizer=true")
    )
    assert len(fused) > 24
    assert fused == pytest.approx(loop, rel=1e-5, abs=1e-7)  # sums rounded in another order


@pytest.mark.slow
def test_eval_capacity_false_changes_validation_only(compose_cfg, tmp_path: Path) -> None:
    cf = ("variant=switch", "variant.capacity_factor=0.5")
    capped = rows_of(compose_cfg, tmp_path / "a", *cf)
    free = rows_of(compose_cfg, tmp_path / "b", *cf, "task.eval_capacity=false")
    train = [[r["value"] for r in rows if r["metric"] == "train_loss"] for rows in (capped, free)]
    assert train[0] == train[1]  # training still drops
    val = [[r["value"] for r in rows if r["metric"] == "val_loss"] for rows in (capped, free)]
    assert val[0] != val[1]


@pytest.mark.slow
def test_z_loss_on_deepseek_moe_is_logged(compose_cfg, tmp_path: Path) -> None:
    rows = rows_of(compose_cfg, tmp_path, "variant=deepseek_moe", "variant.z_loss_coef=1e-3")
    assert any(r["metric"] == "aux_loss" and r.get("loss") == "z" for r in rows)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("task.router_init_scale=-1", "router_init_scale=-1"),
        ("task.router_init_scale=0", "router_init_scale=0"),
    ],
)
def test_bad_option_names_the_field(compose_cfg, override: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        job(compose_cfg, "variant=switch", override)


def test_dropless_eval_refused_for_expert_choice(compose_cfg) -> None:
    with pytest.raises(ValueError, match=r"task\.eval_capacity=false is not allowed"):
        convergence.build_model(
            job(compose_cfg, "variant=expert_choice", "task.eval_capacity=false")
        )


COMMITTED_STEP_10 = {"dense": 5.371380, "deepseek_moe": 5.422419}  # reports/claims, seed 0


@pytest.mark.slow
@pytest.mark.parametrize("arm", sorted(COMMITTED_STEP_10))
def test_default_path_gives_the_committed_claims_losses(compose_cfg, tmp_path: Path, arm) -> None:
    """The claims preset's first 10 steps (inside warm-up, so the step count does not enter the
    schedule) give the committed run's mean training loss: new options left at their defaults
    do not change the default path."""
    cfg = compose_cfg("+experiment=claims", f"+claims={arm}", "seed=0", "task.steps=10")
    assert app.execute(cfg, tmp_path, "test") == "ok"
    rows = read_job_rows(tmp_path)
    (loss,) = [r["value"] for r in rows if r["metric"] == "train_loss" and r["step"] == 10]
    assert loss == pytest.approx(COMMITTED_STEP_10[arm], abs=2e-6)


def read_job_rows(folder: Path) -> list[dict]:
    """A job folder's rows (its part files), none unreadable."""
    rows, problems = read_rows(folder)
    assert problems == []
    return rows


# one arm in the default run (the composition order is the same for each), all in the slow run
@pytest.mark.parametrize(
    "arm", some_slow(["dense", "switch_cf125", "deepseek_moe"], ["switch_cf125", "deepseek_moe"])
)
def test_a_half_batch_arm_trains_on_the_same_tokens_as_its_base(compose_cfg, arm: str) -> None:
    """Composed in a multirun job's override order (sweep params, then the command line), the
    half-batch arm keeps its doubled schedule: the preset's settings do not override it."""
    base = compose_cfg(f"ladder_arm={arm}", "seed=0", "+experiment=ladder_causes").task
    half = compose_cfg(f"ladder_arm={arm}_half_batch", "seed=0", "+experiment=ladder_causes").task
    assert half.batch_size * 2 == base.batch_size
    assert (half.steps, half.warmup_steps, half.eval_every) == (
        2 * base.steps, 2 * base.warmup_steps, 2 * base.eval_every
    )  # fmt: skip
    assert half.eval_batches * half.batch_size == base.eval_batches * base.batch_size
