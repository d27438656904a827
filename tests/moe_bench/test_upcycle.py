"""Upcycling in task=convergence: checkpoints (task.save), an upcycled LM's function at step 0
against its dense parent (copy, granular), the errors, and a child that trains."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moe_bench import __main__ as app
from moe_bench import config, upcycle
from moe_bench.lm import LMConfig, TinyLM, build_lm
from moe_bench.results import read_rows
from variants.compute.assignments import make_routing
from variants.compute.backends import loop

from .conftest import FAST

LM = [*FAST, "task=convergence", "task.n_layers=2", "task.seq_len=16", "task.batch_size=4"]
# the dense parent's FFN is 128 wide (as model=tiny's active * d_ff = 2 * 64)
DENSE = {"d_ff": 128, "expert_hidden": 128, "num_experts": 1, "top_k": 1}
COPY = {"num_experts": 4, "expert_hidden": 128, "top_k": 2}
GRANULAR = {"num_experts": 8, "expert_hidden": 32, "top_k": 4}


def lm_of(variant: str, seed: int = 0, n_heads: int = 4, **fields) -> TinyLM:
    """The convergence task's LM (2 blocks of width 32), built from seed `seed`."""
    torch.manual_seed(seed)
    return build_lm(variant, fields, LMConfig(d_model=32, n_layers=2, n_heads=n_heads, seq_len=16))


def dense_parent(folder: Path, seed: int = 3) -> TinyLM:
    """A dense LM (its random init stands in for a trained one), saved as task.save would."""
    lm = lm_of("dense", seed, **DENSE).eval()
    upcycle.save_checkpoint(lm, "dense", lm.blocks[0].ffn.cfg, 7, folder)
    return lm


def child(
    parent_dir: Path, variant: str = "mixtral", rule: str = "copy", noise: float = 0.0, **fields
) -> TinyLM:
    lm = lm_of(variant, **{"seed": 5, **fields})
    task = SimpleNamespace(init_from=str(parent_dir), upcycle=rule, upcycle_noise=noise)
    upcycle.upcycle(lm, task, seed=5)
    return lm.eval()


def test_checkpoint_is_written_whole_with_what_a_child_checks(tmp_path) -> None:
    dense_parent(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind
    saved = upcycle.load_checkpoint(str(tmp_path))
    assert (saved["variant"], saved["kind"], saved["step"]) == ("dense", "dense", 7)
    assert saved["lm"]["n_layers"] == 2 and saved["layer"]["d_ff"] == 128


def test_copy_upcycled_mixtral_computes_its_dense_parent_at_step_0(tmp_path) -> None:
    """Every expert a copy of the FFN, mixtral's top-2 weights renormalised to sum to 1: the
    LM's logits are the dense parent's; the routers are fresh, not copied from anywhere."""
    parent = dense_parent(tmp_path)
    lm = child(tmp_path, **COPY)
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm(idx).logits, parent(idx).logits, rtol=0, atol=1e-6)
    bank = lm.blocks[0].ffn.experts
    assert all(torch.equal(bank.w1[e], bank.w1[0]) for e in range(4))
    # switch keeps top-1's raw probability p < 1, which scales the FFN: not the parent
    switch = child(tmp_path, "switch", num_experts=4, expert_hidden=128, capacity_factor=None)
    with torch.no_grad():
        assert not torch.allclose(switch(idx).logits, parent(idx).logits, atol=1e-4)


def test_granular_shards_sum_to_the_dense_ffn_with_weights_of_one(tmp_path) -> None:
    """F = 128 cut into m = 4 shards of 32, E = 8 (each shard twice): a routing that keeps
    experts 0..3 for every token with weight 1 computes each block's dense FFN."""
    parent = dense_parent(tmp_path)
    lm = child(tmp_path, rule="granular", **GRANULAR)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    T, m = 10, 4
    routing = make_routing(
        token_A=torch.arange(T).repeat_interleave(m),
        expert_A=torch.arange(m).repeat(T),
        weight_A=torch.ones(T * m),
        scores_TE=torch.full((T, 8), 1 / 8),
        logits_TE=torch.zeros(T, 8),
        demand_E=torch.tensor([T] * m + [0] * m),
    )
    for block, dense in zip(lm.blocks, parent.blocks):
        with torch.no_grad():
            y = loop(x, routing, block.ffn.experts).y_TD
            torch.testing.assert_close(y, dense.ffn(x).y, rtol=0, atol=1e-6)
        bank = block.ffn.experts
        assert torch.equal(bank.w1[1], bank.w1[5]) and not torch.equal(bank.w1[1], bank.w1[2])


def test_everything_but_the_experts_is_the_parents(tmp_path) -> None:
    parent = dense_parent(tmp_path)
    lm = child(tmp_path, **COPY)
    fresh = lm_of("mixtral", seed=5, **COPY)
    for name, value in lm.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(value, parent.state_dict()[name]), name
        elif ".router." in name:  # the router: as freshly initialised by the child's seed
            assert torch.equal(value, fresh.state_dict()[name]), name


def test_noise_perturbs_the_copies_apart(tmp_path) -> None:
    parent = dense_parent(tmp_path)
    bank = child(tmp_path, noise=0.01, **COPY).blocks[0].ffn.experts
    dense_w1 = parent.blocks[0].ffn.experts.w1[0]
    assert not torch.equal(bank.w1[0], bank.w1[1])
    ratio = (bank.w1 / dense_w1).detach()  # 1 + 0.01 N(0, 1) per weight
    assert 0.005 < float((ratio - 1).std()) < 0.02


@pytest.mark.parametrize(
    ("rule", "fields", "message"),
    [
        ("copy", {**COPY, "expert_hidden": 64}, r"task.upcycle='copy' needs expert_hidden=128"),
        ("granular", {**GRANULAR, "num_experts": 6}, r"and num_experts=6 to be a multiple of m"),
        ("copy", {**COPY, "n_heads": 2}, r"was trained with n_heads=4, this run has n_heads=2"),
        ("copy", {**COPY, "activation": "swiglu"}, r"variant.activation='swiglu' must match"),
        ("copy", {**COPY, "num_shared_experts": 1}, r"num_shared_experts=1 must be 0"),
    ],
)
def test_mismatches_name_the_field(tmp_path, rule: str, fields: dict, message: str) -> None:
    dense_parent(tmp_path)
    variant = "deepseek_moe" if "num_shared_experts" in fields else "mixtral"
    with pytest.raises(ValueError, match=message):
        child(tmp_path, variant, rule, **fields)


def test_missing_or_non_dense_parent_names_task_init_from(compose_cfg, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^task.init_from='.*' holds no model.pt"):
        upcycle.load_checkpoint(str(tmp_path / "nowhere"))
    moe = lm_of("mixtral", **COPY)
    upcycle.save_checkpoint(moe, "mixtral", moe.blocks[0].ffn.cfg, 1, tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'mixtral' run; upcycling starts from a dense"):
        child(tmp_path, **COPY)
    with pytest.raises(ValueError, match=r"^task: upcycle='split' is not one of 'copy', 'gran"):
        config.resolve(compose_cfg(*LM, "variant=dense", "task.upcycle=split"))
    with pytest.raises(ValueError, match=r"^init_from='' must be a job folder path or null"):
        upcycle.check_fields(SimpleNamespace(init_from="", upcycle="copy", upcycle_noise=0.0))


def rows(folder: Path) -> list[dict]:
    return read_job_rows(folder)


@pytest.mark.slow
def test_saved_dense_run_upcycles_and_the_child_trains(compose_cfg, tmp_path) -> None:
    """End to end through the runner: a dense run saves its model; an upcycled mixtral starts
    from it at the parent's final validation loss and its loss falls; a missing parent is a
    failed job naming task.init_from."""
    common = [*LM, "task.lr=3e-3", "task.warmup_steps=2", "task.eval_every=100"]
    parent_dir, child_dir = tmp_path / "parent", tmp_path / "child"
    cfg = compose_cfg(*common, "variant=dense", "task.steps=20", "task.save=true")
    assert app.execute(cfg, parent_dir, "parent") == "ok"
    assert (parent_dir / "model.pt").is_file()
    parent_val = [r["value"] for r in rows(parent_dir) if r["metric"] == "val_loss"]
    copy = [f"variant.{k}={v}" for k, v in COPY.items()]
    cfg = compose_cfg(
        *common, "variant=mixtral", *copy, "task.steps=20", f"task.init_from={parent_dir}"
    )
    assert app.execute(cfg, child_dir, "child") == "ok"
    child_val = [r["value"] for r in rows(child_dir) if r["metric"] == "val_loss"]
    assert child_val[0] == pytest.approx(parent_val[-1], abs=1e-5)  # step 0: the parent
    assert child_val[-1] < child_val[0] - 0.05  # and it trains
    missing = compose_cfg(
        *common, "variant=mixtral", *copy, "task.steps=2", f"task.init_from={tmp_path / 'no'}"
    )
    assert app.execute(missing, tmp_path / "orphan", "orphan") == "failed"
    error = next(r["error"] for r in rows(tmp_path / "orphan") if r["metric"] == "job")
    assert "task.init_from=" in error and "holds no model.pt" in error


def read_job_rows(folder: Path) -> list[dict]:
    """A job folder's rows (its part files), none unreadable."""
    rows, problems = read_rows(folder)
    assert problems == []
    return rows
