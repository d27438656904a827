"""Activation checkpointing of an MoE layer whose statistics are never counted twice.

`checkpointed(layer, x, **kwargs)` runs `layer(x, **kwargs)` under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`: the forward keeps no activations and
backward runs the layer's forward again to rebuild them. A router's forward also changes
state: DeepSeek-V3's `load_count`, ReMoE's `active_count`/`slot_count`, the running
global-batch counts of `balance_scope="global_batch"`. Run twice, that state is counted twice
(the bias update then sees double the load, pytorch/torchtitan#1593), and the recompute of a
global-batch loss reads counts that already include its own forward, so it rebuilds a graph
with another f than the forward used.

The fix here is one rule for every layer: the recompute runs from the state the forward saw
and leaves the state as it found it. Before the forward, the layer's state is snapshotted (its
buffers and the plain tensor attributes of its modules, such as the router's
`balance_counts`); the recompute swaps that snapshot in, runs, and swaps the current state
back. So state changes exactly once per forward, and the recomputed graph is the forward's.
The checkpoint's own RNG handling (`preserve_rng_state=True`) replays random routing draws
(GShard's second choice, noisy gating) bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

State = list[tuple[nn.Module, str, torch.Tensor | None]]


def snapshot(layer: nn.Module) -> State:
    """Every buffer of `layer`'s modules and every plain tensor attribute (state a forward may
    change), cloned; None attributes are kept as None."""
    state: State = []
    for module in layer.modules():
        for name, buf in module._buffers.items():
            state.append((module, name, None if buf is None else buf.detach().clone()))
        for name, value in vars(module).items():
            if name.startswith("_") or not (value is None or isinstance(value, torch.Tensor)):
                continue
            state.append((module, name, None if value is None else value.detach().clone()))
    return state


def restore(state: State, current: State | None = None) -> None:
    """Put a snapshot back: buffers in place (their identity is kept), attributes rebound; an
    attribute in `current` that the snapshot lacks (set by a later forward) is set to None."""
    known = {(id(module), name) for module, name, _ in state}
    for module, name, _ in current or ():
        if (id(module), name) not in known and name not in module._buffers:
            setattr(module, name, None)
    for module, name, value in state:
        if name in module._buffers:
            if value is not None:
                module._buffers[name].copy_(value)
        else:
            setattr(module, name, None if value is None else value.clone())


def checkpointed(layer: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
    """`layer(x, **kwargs)` with activation checkpointing; state changes once (module doc)."""
    before = snapshot(layer)
    calls = [0]

    def run(x: torch.Tensor) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return layer(x, **kwargs)
        now = snapshot(layer)  # backward: later forwards may have counted since
        restore(before, now)
        try:
            return layer(x, **kwargs)
        finally:
            restore(now, before)

    return checkpoint(run, x, use_reentrant=False)
