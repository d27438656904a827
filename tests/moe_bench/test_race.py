"""The race task: the job's variant, `task.variants` and the dense reference timed round-robin
in one job, one set of rows per arm describing that arm."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_bench import config, registry, results
from moe_bench.__main__ import execute
from tests.moe_bench.conftest import FAST

SIZE_COLUMNS = ("params_total", "params_active", "flops_per_token", "leaks_future_tokens",
                "variant.top_k", "variant.num_experts", "variant.expert_hidden")  # fmt: skip
RACE = [*FAST, "task=race", "task.warmup=1", "task.repeats=6", "task.max_repeats=6"]


def test_race_rows_per_arm(compose_cfg, tmp_path: Path) -> None:
    # switch is the job's own variant: named again in task.variants it is raced once
    cfg = compose_cfg(*RACE, "variant=switch", "task.variants=[gshard,switch,deepseek_moe]")
    assert execute(cfg, tmp_path, "race") == "ok"
    frame = results.load(tmp_path).query("metric != 'job'")
    arms = frame[~frame.reference.astype(bool)]
    reference = frame[frame.reference.astype(bool)]
    assert list(dict.fromkeys(arms.variant)) == ["switch", "gshard", "deepseek_moe"]
    assert set(reference.variant) == {"dense"}
    for p in ("fwd", "fwd_bwd"):
        of_pass = arms[arms["pass"] == p]
        assert (
            of_pass.groupby("variant").metric.apply(sorted).tolist()
            == [sorted([f"{p}_ms", "tokens_per_s", "tflops", "ratio_to_dense"])] * 3
        )
        assert sorted(reference[reference["pass"] == p].metric) == sorted(
            [f"{p}_ms", "tokens_per_s", "tflops"]
        )
        ref_ms = reference[reference.metric == f"{p}_ms"].value.iloc[0]
        ratios = of_pass[of_pass.metric == "ratio_to_dense"]
        assert (ratios.dense_ms == ref_ms).all() and (ratios.repeats == 6).all()
        assert ((ratios.ratio_min <= ratios.value) & (ratios.value <= ratios.ratio_max)).all()
        assert ratios.ratio_ci95.notna().all()
    assert (arms.noisy == (arms.noisy_reason != "")).all()
    assert (~reference.noisy.astype(bool)).all() and (reference.noisy_reason == "").all()
    # each arm's columns are those a job of its variant would write; the rest are the job's
    for name in ("switch", "gshard", "deepseek_moe"):
        own = config.resolve(compose_cfg(*RACE, f"variant={name}")).columns
        row = arms[arms.variant == name].iloc[0]
        for key in SIZE_COLUMNS:
            assert row[key] == own[key], (name, key)
    assert set(frame["task.variants"]) == {"gshard,switch,deepseek_moe"}
    assert set(frame["backend"]) == {cfg.backend}
    line = registry.lookup("race").summary(results.read_rows(tmp_path)[0])
    assert line.startswith("fwd_bwd vs dense: ") and line.count(" x") == 3


def test_race_refuses_an_unknown_variant(compose_cfg) -> None:
    with pytest.raises(ValueError, match=r"^task: variants: 'nope' is not one of .*switch"):
        config.resolve(compose_cfg(*RACE, "task.variants=[gshard,nope]"))
