"""Routing traces: the kept (token, expert, weight) assignments of chosen steps and layers.

Shape legend: N kept assignments in the whole trace, M recorded tokens (steps x tokens per step),
A assignments of one step and layer.

One file per job, `<job dir>/trace.npz` (numpy, compressed), integer arrays so a trace of a CPU
run stays a few MB. It is what a trained router decided, so the expert-parallel simulator can
replay it at any rank count and a second run or backend can be forced onto the same decisions.
Torch-free: numpy only, so the report side can read it.

Assignment arrays (length N): `step_N`, `layer_N`, `token_N` (index in the step's flattened
batch, b * T + t), `expert_N`, `weight_N` (the combine weight the layer used).
Token arrays (length M): `tok_step_M`, `tok_index_M`, `tok_domain_M` (data domain id),
`tok_id_M` (the token id). `meta`: JSON with at least `num_experts`, `top_k`,
`tokens_per_step`; writers add the variant, the layers, the steps and the domain names.

Router replay arrays (optional; S recorded steps and L recorded layers in the order of meta's
`steps` and `layers`, T tokens per step, D router input width): `router_x_SLTD` (float32, the
router's input of every token), `router_w_SLED` (float32, the router weight used) and
`router_bias_SLE` (float32, a selection bias, zeros for a router without one). With them a
router's logits `x W^T` are recomputed, so another routing rule can be applied to the same
trained router's scores (`moe_bench.epsim`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRACE_FILE = "trace.npz"
ASSIGNMENT_DTYPES = {
    "step_N": np.int32,
    "layer_N": np.int16,
    "token_N": np.int32,
    "expert_N": np.int16,
    "weight_N": np.float32,
}
TOKEN_DTYPES = {
    "tok_step_M": np.int32,
    "tok_index_M": np.int32,
    "tok_domain_M": np.int16,
    "tok_id_M": np.int32,
}
META_REQUIRED = ("num_experts", "top_k", "tokens_per_step")
ROUTER_DTYPES = {
    "router_x_SLTD": np.float32,
    "router_w_SLED": np.float32,
    "router_bias_SLE": np.float32,
}


@dataclass
class Trace:
    """One job's recorded routing; arrays as in the module docstring."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted(set(self.arrays["step_N"].tolist()))

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.arrays["layer_N"].tolist()))

    def routing_of(self, step: int, layer: int) -> dict[str, np.ndarray]:
        """The assignments of one step and layer: `token_A`, `expert_A`, `weight_A`, and the
        step's per-token `domain_T` and `id_T` (indexed by token position)."""
        a = self.arrays
        keep_N = (a["step_N"] == step) & (a["layer_N"] == layer)
        if not keep_N.any():
            raise ValueError(
                f"step={step}, layer={layer} is not in the trace: steps {self.steps}, "
                f"layers {self.layers}"
            )
        tok_M = a["tok_step_M"] == step
        T = int(self.meta["tokens_per_step"])
        domain_T = np.full(T, -1, dtype=np.int16)
        id_T = np.full(T, -1, dtype=np.int32)
        domain_T[a["tok_index_M"][tok_M]] = a["tok_domain_M"][tok_M]
        id_T[a["tok_index_M"][tok_M]] = a["tok_id_M"][tok_M]
        return {
            "token_A": a["token_N"][keep_N].astype(np.int64),
            "expert_A": a["expert_N"][keep_N].astype(np.int64),
            "weight_A": a["weight_N"][keep_N],
            "domain_T": domain_T,
            "id_T": id_T,
        }

    @property
    def has_router(self) -> bool:
        return all(name in self.arrays for name in ROUTER_DTYPES)

    def router_of(self, step: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_TD, w_ED, bias_E) of one recorded step and layer, float32: the router replay
        arrays of the module docstring."""
        if not self.has_router:
            raise ValueError(
                f"this trace has no router replay arrays {sorted(ROUTER_DTYPES)} (record with "
                "task.trace_router=true)"
            )
        steps, layers = list(self.meta["steps"]), list(self.meta["layers"])
        if step not in steps or layer not in layers:
            raise ValueError(f"step={step}, layer={layer}: recorded {steps} x layers {layers}")
        s, j = steps.index(step), layers.index(layer)
        a = self.arrays
        return (
            a["router_x_SLTD"][s, j].astype(np.float32),
            a["router_w_SLED"][s, j].astype(np.float32),
            a["router_bias_SLE"][s, j].astype(np.float32),
        )


def check_trace(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Raise ValueError naming the first array or meta field that breaks the format."""
    for group in (ASSIGNMENT_DTYPES, TOKEN_DTYPES):
        lengths = set()
        for name in group:
            if name not in arrays:
                raise ValueError(f"trace array {name!r} is missing; a trace holds {sorted(group)}")
            if arrays[name].ndim != 1:
                raise ValueError(f"trace array {name!r} has shape {arrays[name].shape}; it is 1-D")
            lengths.add(len(arrays[name]))
        if len(lengths) > 1:
            raise ValueError(f"trace arrays {sorted(group)} differ in length: {sorted(lengths)}")
    for key in META_REQUIRED:
        if key not in meta:
            raise ValueError(f"trace meta lacks {key!r}; it needs {list(META_REQUIRED)}")
    E = int(meta["num_experts"])
    expert_N = arrays["expert_N"]
    if len(expert_N) and (expert_N.min() < 0 or expert_N.max() >= E):
        raise ValueError(
            f"trace expert_N holds {int(expert_N.min())}..{int(expert_N.max())}; "
            f"allowed 0..{E - 1} (num_experts={E})"
        )


def save_trace(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write a trace atomically (temp file, then rename): a reader never sees half a file.
    The router replay arrays are written when `arrays` holds them all."""
    dtypes = {**ASSIGNMENT_DTYPES, **TOKEN_DTYPES}
    if all(name in arrays for name in ROUTER_DTYPES):
        dtypes.update(ROUTER_DTYPES)
    cast = {n: np.asarray(arrays[n], dtype=d) for n, d in dtypes.items()}
    check_trace(cast, meta)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta, sort_keys=True)), **cast)
    os.replace(tmp, path)
    return path


def load_trace(path: str | Path) -> Trace:
    """Read and check a trace written by `save_trace` (a job dir or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRACE_FILE
    with np.load(path, allow_pickle=False) as f:
        arrays = {n: f[n] for n in f.files if n != "meta"}
        meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    check_trace(arrays, meta)
    return Trace(arrays=arrays, meta=meta)
