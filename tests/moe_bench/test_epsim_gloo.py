"""The simulator against the real thing: at 2 and 4 gloo ranks, every expert-parallel preset
variant's measured traffic (task=expert_parallel's eval forward: `ExpertParallel` on the task's
global batch, split by sequence) equals what `moe_bench.epsim` counts from the same routing.

One spawn per rank count runs every variant (fresh processes import torch: seconds each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import moe_bench.tasks.expert_parallel as ep_task
import variants
from moe_bench import components
from moe_bench.config import ModelConfig
from moe_bench.epsim import placement
from moe_bench.epsim.traffic import Sizes, count
from moe_bench.launch import spawn_ranks
from variants.parallel.expert_parallel import INDEX_BYTES, ExpertParallel

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
PRESET = SWEEPS / "experiment" / "expert_parallel.yaml"
MODEL = ModelConfig(d_model=32, d_ff=64, tokens=512, seq_len=32)  # 16 sequences


def preset_specs(P: int) -> list[ep_task.RankSpec]:
    """One RankSpec per variant of the expert_parallel preset (its sweep's variant list)."""
    swept = yaml.safe_load(PRESET.read_text())["hydra"]["sweeper"]["params"]["variant"]
    specs = []
    for option in swept.split(","):
        path = SWEEPS / "variant" / f"{option}.yaml"
        fields = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}
        name = fields.pop("name")
        cfg = variants.make_config(name, d_model=MODEL.d_model, **fields)
        task = ep_task.ExpertParallelConfig(ep_size=P)
        specs.append(ep_task.RankSpec(name, cfg, MODEL, task, 0, torch.float32, "cpu", "grouped"))
    return specs


def measure(rank: int, world: int, specs: list[ep_task.RankSpec]) -> list | None:
    """On every rank: each variant's eval-forward traffic as the expert_parallel task gets it."""
    stats = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        layer = components.lookup(spec.variant).build(spec.layer, torch.device("cpu"), spec.dtype)
        x_local = ep_task.local_block(ep_task.global_batch(spec, torch.device("cpu")), rank, world)
        stats.append(ep_task.eval_traffic(ExpertParallel(layer, backend=spec.backend), x_local))
    return stats if rank == 0 else None


def simulated(spec: ep_task.RankSpec, P: int):
    """The same routing (each rank's router on its own sequences), counted by the simulator."""
    torch.manual_seed(spec.seed)
    layer = components.lookup(spec.variant).build(spec.layer, torch.device("cpu"), spec.dtype)
    layer.eval()
    x_BSD = ep_task.global_batch(spec, torch.device("cpu"))
    tokens, experts, src = [], [], []
    offset = 0
    for rank in range(P):
        x_local = ep_task.local_block(x_BSD, rank, P)
        with torch.no_grad():
            routing, _ = layer.router(x_local.reshape(-1, MODEL.d_model), x_local.shape[0])
        tokens.append(routing.token.numpy() + offset)
        experts.append(routing.expert.numpy())
        T = x_local.shape[0] * x_local.shape[1]
        src.append(np.full(T, rank))
        offset += T
    token_A, expert_A, src_T = map(np.concatenate, (tokens, experts, src))
    plan = placement.contiguous(spec.layer.num_experts, P)
    sizes = Sizes(MODEL.d_model, 1, x_bytes=4, weight_bytes=4, index_bytes=INDEX_BYTES)
    return count(token_A, plan.rank_of(token_A, expert_A), src_T, P, P, sizes)


@pytest.mark.slow  # several processes
@pytest.mark.parametrize("P", [2, 4])
def test_simulated_traffic_equals_the_gloo_ranks_for_every_preset_variant(P: int) -> None:
    specs = preset_specs(P)
    assert len(specs) == 10
    measured = spawn_ranks(measure, P, args=(specs,), timeout_s=300)[0]
    for spec, stats in zip(specs, measured):
        sim = simulated(spec, P)
        label = f"{spec.variant} at P={P}"
        assert sim.rank_rows.tolist() == stats.rank_tokens.tolist(), label
        assert sim.rank_assignments.tolist() == stats.rank_assignments.tolist(), label
        assert (sim.dispatch_bytes, sim.combine_bytes) == (
            stats.dispatch_bytes,
            stats.combine_bytes,
        ), label
        assert sim.devices_per_token == stats.devices_per_token, label
        assert sim.devices_per_token_max == stats.devices_per_token_max, label
        assert sim.straggler == pytest.approx(stats.rank_imbalance, rel=1e-12), label
        if spec.variant == "deepseek_v2":
            assert sim.devices_per_token_max <= spec.layer.max_devices, label
