"""Router replay: record a run's routing in the trace format (`moe_bench.trace`) and force it
onto another run, backend or precision, so they are compared on identical routing decisions.

Shape legend: B sequences, S sequence length, T = B * S tokens of a step, A kept assignments
of one layer, N assignments of the whole trace.

Anchor: Megatron-Core's router replay (NVIDIA/Megatron-LM PR #2101, `RouterReplay`): record
each MoE layer's top-K choices, then route by them in a later forward (and in its recompute
under activation checkpointing). Departure: Megatron replays the expert indices and
recomputes their probabilities from the current router; here the layer takes the recorded
(token, expert, weight) assignments as they are (`Router.replay`), so a replayed forward
reproduces the recorded output to float tolerance on any backend, and it works for every
routing (expert choice, top-p, ReLU routing, capacity drops), not only a fixed top-K. The
router's combine weights are then constants: no gradient reaches the router through them, no
loss is computed and no state is counted (a replayed forward is for comparison, not
training). MoE++ is refused (its zero-computation assignments are not in a trace).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_bench.lm import TinyLM
from moe_bench.trace import TRACE_FILE, Trace, save_trace


def record(
    path: str | Path, steps: list[dict[str, np.ndarray]], lm: TinyLM, meta: dict[str, Any]
) -> Path:
    """Write the steps' arrays (from `moe_bench.trace_recorder.step_arrays`) as one trace
    file; `meta` adds to the fields the layers give (experts, top_k, tokens per step, layers,
    steps)."""
    arrays = {k: np.concatenate([s[k] for s in steps]) for k in steps[0]}
    ffn = lm.blocks[lm.cfg.moe_layers()[0]].ffn.cfg
    meta = {
        "num_experts": ffn.num_experts,
        "top_k": ffn.top_k,
        "d_model": ffn.d_model,
        "tokens_per_step": int((arrays["tok_step_M"] == arrays["tok_step_M"][0]).sum()),
        "layers": lm.cfg.moe_layers(),
        "steps": sorted(set(arrays["step_N"].tolist())),
        **meta,
    }
    json.dumps(meta)  # fails here, not half-way through the write, on a value JSON cannot hold
    path = Path(path)
    return save_trace(path / TRACE_FILE if path.is_dir() else path, arrays, meta)


def routers(lm: TinyLM) -> dict[int, nn.Module]:
    """The router of each MoE block, by block index."""
    return {i: lm.blocks[i].ffn.router for i in lm.cfg.moe_layers()}


@contextmanager
def replaying(lm: TinyLM, trace: Trace, step: int) -> Iterator[TinyLM]:
    """Inside, every MoE layer of `lm` routes by the trace's step `step` (the model must run
    that step's whole batch in one forward: token indices are the step's)."""
    found = routers(lm)
    missing = sorted(set(found) - set(trace.layers))
    if missing:
        raise ValueError(f"trace has no layer {missing[0]}; it holds layers {trace.layers}")
    try:
        for layer, router in found.items():
            a = trace.routing_of(step, layer)
            router.replay(
                tuple(torch.from_numpy(a[k]) for k in ("token_A", "expert_A", "weight_A"))
            )
        yield lm
    finally:
        for router in found.values():
            router.replay(None)
