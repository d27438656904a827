"""task=expert_parallel end to end on gloo ranks (tiny sizes), its failures, and its preset.

Each spawned job costs seconds on 2 cores (fresh processes import torch), so one job is run
once per module and checked by several tests.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pandas as pd
import pytest

import moe_bench
import moe_bench.tasks.expert_parallel as ep_task
from moe_bench import results
from moe_bench.__main__ import execute
from moe_bench.config import resolve
from tests.moe_bench.conftest import FAST

T, K = 256, 3  # model=tiny: 4 sequences of 64 tokens, 2 per rank
V2 = [
    "variant=deepseek_v2", "variant.num_experts=8", "variant.expert_hidden=16",
    f"variant.top_k={K}", "variant.num_shared_experts=1", "variant.num_devices=2",
    "variant.max_devices=1", "variant.capacity_factor=null",
]  # fmt: skip
EP = ["task=expert_parallel", "task.warmup=0", "task.repeats=1", "task.timeout_s=300"]


def _ep_job(compose_cfg, out: Path, *overrides: str) -> tuple[str, pd.DataFrame]:
    status = execute(compose_cfg(*FAST, *EP, *overrides), out, " ".join(overrides))
    return status, results.load(out)


def _rows(frame: pd.DataFrame, metric: str, **where) -> pd.DataFrame:
    rows = frame[frame.metric == metric]
    for key, value in where.items():
        rows = rows[rows[key].astype(str) == str(value)]
    return rows


@pytest.fixture(scope="module")
def v2_job(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    out = tmp_path_factory.mktemp("ep_v2")
    return _ep_job(moe_bench.compose, out, *V2, "task.ep_size=2", "task.steps=3")


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_job_runs_on_two_gloo_ranks_and_rank0_writes_every_metric(v2_job) -> None:
    status, frame = v2_job
    assert status == "ok" and set(frame.status) == {"ok"}, frame.error.dropna().tolist()
    for metric in ("devices_per_token", "bytes_per_token", "remote_fraction",
                   "rank_imbalance", "a2a_ms"):  # fmt: skip
        assert set(_rows(frame, metric).layer.astype(str)) >= {"0", "mean"}, metric
    a2a = _rows(frame, "a2a_ms", layer="mean").iloc[0]
    assert a2a.value == pytest.approx(a2a.dispatch_ms + a2a.combine_ms)
    assert a2a.route_ms >= 0 and a2a.expert_ms >= 0
    for pass_ in ("fwd", "fwd_bwd"):
        tps = _rows(frame, "tokens_per_s", **{"pass": pass_}).iloc[0]
        assert tps.value == pytest.approx(T / tps.ep_ms * 1e3)
        assert tps.ep1_tokens_per_s == pytest.approx(T / tps.ep1_ms * 1e3)
        speedup = _rows(frame, "speedup_vs_ep1", **{"pass": pass_}).value.iloc[0]
        assert speedup == pytest.approx(tps.ep1_ms / tps.ep_ms)
    train = _rows(frame, "rank_imbalance", phase="train")
    assert sorted(train.step) == [0, 1, 2] and (train.value >= 1).all()
    assert (frame["task.ep_size"] == 2).all()


@pytest.mark.slow  # several processes (the module's 2-rank job): the slow run
def test_rank_tokens_add_up_to_the_routed_tokens(v2_job) -> None:
    _, frame = v2_job
    matrix = _rows(frame, "rank_tokens")
    assert sorted(zip(matrix.src, matrix.dst)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert matrix.assignments.sum() == T * K  # dropless: every token's K assignments
    per_token = _rows(frame, "devices_per_token", layer="mean").iloc[0]
    assert matrix.value.sum() == pytest.approx(per_token.value * T)  # one row per (token, rank)
    received = matrix.groupby("dst").value.sum()
    imbalance = _rows(frame, "rank_imbalance", layer="mean", phase="eval").value.iloc[0]
    assert imbalance == pytest.approx(received.max() / received.mean())


@pytest.mark.slow  # several processes (the module's 2-rank job): the slow run
def test_deepseek_v2_never_reaches_more_than_max_devices(v2_job) -> None:
    _, frame = v2_job
    per_token = _rows(frame, "devices_per_token", layer="mean").iloc[0]
    assert per_token.devices_per_token_max <= 1 and per_token.value == pytest.approx(1.0)
    # M=1: a token's rows go to one rank only, so every assignment sent is one row's
    assert (frame["variant.max_devices"] == 1).all()


def _rank_1_fails(rank: int, world: int, spec) -> dict | None:
    """Spawned ranks import this module-level function (and the task module unpatched):
    rank 1 raises, rank 0 runs the real rank into its collectives."""
    if rank == 1:
        raise ValueError("rank 1 broke on purpose")
    return ep_task.rank_main(rank, world, spec)


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_failing_rank_fails_the_job_with_its_message(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(ep_task, "rank_main", _rank_1_fails)
    started = time.monotonic()
    status, frame = _ep_job(compose_cfg, tmp_path, *V2, "task.ep_size=2", "task.steps=1")
    assert status == "failed" and time.monotonic() - started < 300  # no hang
    error = frame.error.iloc[-1]
    # every failed rank's traceback; rank 0's broken collective may be seen first
    assert error.startswith("RankFailed: rank ") and "rank 1 failed" in error
    assert "ValueError: rank 1 broke on purpose" in error


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["task.ep_size=3"], "num_experts=8 must be divisible by world_size=3"),
        (
            ["task.ep_size=8", "variant.num_devices=8", "variant.max_devices=3"],
            "sequences must be divisible by",
        ),
        (["task.dist_backend=nccl", "task.ep_size=2"], "nccl needs CUDA tensors"),
        (
            ["backend=padded", "variant.capacity_factor=1.0", "task.ep_size=2"],
            "backend='padded': expert parallelism",
        ),
    ],
)
def test_impossible_settings_fail_before_any_rank_starts(
    compose_cfg, tmp_path: Path, overrides: list[str], match: str
) -> None:
    status, frame = _ep_job(compose_cfg, tmp_path, *V2, *overrides)
    assert status == "failed" and match in frame.error.iloc[-1]


def test_dense_is_refused(compose_cfg, tmp_path: Path) -> None:
    status, frame = _ep_job(compose_cfg, tmp_path, "variant=dense")
    assert status == "failed" and "no routed experts" in frame.error.iloc[-1]


@pytest.mark.parametrize(
    ("variant", "match"),
    [("longcat_flash", "has a forward of its own"), ("expert_choice", "not token-choice")],
)
def test_unshardable_layers_fail_before_any_rank_starts(
    compose_cfg, tmp_path: Path, monkeypatch, variant: str, match: str
) -> None:
    def no_spawn(*args, **kwargs):
        raise AssertionError("ranks started")

    monkeypatch.setattr(ep_task, "spawn_ranks", no_spawn)
    status, frame = _ep_job(compose_cfg, tmp_path, f"variant={variant}", "task.ep_size=2")
    assert status == "failed" and match in frame.error.iloc[-1]


RELEASED = (
    "qwen3_moe",
    "qwen3_next",
    "olmoe",
    "phimoe",
    "gpt_oss",
    "llama4",
    "minimax_m2",
    "glm4_moe",
    "dots1",
    "ernie4_5_moe",
    "deepseek_v4",
)  # fmt: skip  (token-choice released-model presets; longcat_flash is refused above)


@pytest.mark.slow  # eleven Hydra composes: the slow run
def test_released_model_presets_pass_every_check_before_ranks_start(compose_cfg) -> None:
    """At 4 ranks (so also at 2): experts divisible, the layer shardable, sequences whole."""
    for variant in RELEASED:
        job = resolve(compose_cfg(*FAST, *EP, f"variant={variant}", "task.ep_size=4"))
        assert ep_task.rank_spec(job).layer is job.layer, variant  # every check passed


@pytest.mark.slow  # several processes per job: the slow run
@pytest.mark.parametrize("variant", ["qwen3_next", "gpt_oss", "deepseek_v4"])
def test_released_model_presets_run_expert_parallel(
    compose_cfg, tmp_path: Path, variant: str
) -> None:
    """A shared gate (Qwen3-Next), expert biases and a clamped SwiGLU (gpt-oss), and
    DeepSeek-V4's learned layer run the task on 2 gloo ranks."""
    status, frame = _ep_job(compose_cfg, tmp_path, f"variant={variant}", "task.ep_size=2",
                            "task.steps=2")  # fmt: skip
    assert status == "ok"
    assert (_rows(frame, "rank_tokens")["value"] > 0).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env_launcher_joins_ranks_started_outside(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    """launcher=env: this process is rank 0 of a 1-rank job a launcher started (torchrun and
    Slurm set these variables); it writes the rows itself."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(_free_port()))):  # fmt: skip
        monkeypatch.setenv(name, value)
    status, frame = _ep_job(
        compose_cfg, tmp_path, *V2, "task.launcher=env", "task.ep_size=1", "task.steps=2"
    )
    assert status == "ok", frame.error.dropna().tolist()
    assert _rows(frame, "remote_fraction", layer="mean").value.iloc[0] == 0.0  # one rank
    assert len(_rows(frame, "rank_tokens")) == 1


def test_env_launcher_refuses_a_world_of_another_size(
    compose_cfg, tmp_path: Path, monkeypatch
) -> None:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(_free_port()))):  # fmt: skip
        monkeypatch.setenv(name, value)
    status, frame = _ep_job(compose_cfg, tmp_path, *V2, "task.launcher=env", "task.ep_size=2")
    assert status == "failed" and "but the launcher started 1 ranks" in frame.error.iloc[-1]


@pytest.mark.slow  # a compose per variant option, seconds; the preset's jobs run in the slow run
def test_preset_composes_at_ep_size_4(compose_cfg) -> None:
    cfg = compose_cfg("+experiment=expert_parallel", hydra=True)
    options = cfg.hydra.sweeper.params.variant.split(",")
    max_devices, groups, names = set(), set(), set()
    for option in options:
        job = resolve(compose_cfg("+experiment=expert_parallel", f"variant={option}"))
        names.add(job.variant)
        assert job.task.name == "expert_parallel" and job.task.ep_size == 4
        assert job.layer.num_experts % 4 == 0 and job.device.type == "cpu"
        ep_task.rank_spec(job)  # every pre-spawn check passes
        if job.variant == "deepseek_v2":
            max_devices.add((job.layer.max_devices, job.layer.alpha3))
        if job.variant == "deepseek_v3":
            groups.add((job.layer.num_groups, job.layer.topk_groups))
    assert max_devices == {(1, 0.02), (2, 0.02), (3, 0.02), (4, 0.02), (3, 0.0)}
    assert groups == {(4, 2), (1, 1)}
    assert {"deepseek_moe", "mixtral", "switch"} <= names
