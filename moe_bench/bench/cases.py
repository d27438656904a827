"""Benchmark cases for MoE layer speed: the case table, layers, one training step, a HF-style fake.

Shape legend: T tokens, D model width, E routed experts, H expert hidden width, K experts per
token, A = T*K assignments.

Sizes (T=4096, D=512, float32, 2 threads unless said):
- `fine`: DeepSeekMoE-like fine-grained experts, E=64, H=128, K=8 (dense reference: width 1024).
- `coarse`: Mixtral-like, E=8, H=1024, K=2 (dense reference: width 2048).
- `quick`: the quick sweep's size, T=2048, D=128, E=64, H=32, K=8, 1 shared expert (dense
  reference: width 288), where per-expert dispatch overhead, not GEMM FLOPs, dominates.
Every expert is SwiGLU, as in DeepSeekMoE and Mixtral (and in HF's peer, whose experts are
always gated). The dense reference of each size is the SwiGLU FFN with the same active expert
FLOPs (`moe_bench.isocompute.dense_reference`).

Peers: `hf_style` re-implements HF's old DeepseekMoE training path (a boolean mask per
expert); `hf_deepseek_v2/grouped_mm` is HF transformers' own DeepSeek-V2 MoE block with its
`grouped_mm` experts (`hf_peer.py`) at the fine-grained sizes, where transformers is installed
(the dev extra); elsewhere it is skipped with the reason.

`tests/benchmarks` times these cases (and smoke-runs them at SMOKE_TOKENS tokens in the default
test run); `scripts/speed_table.py` and `scripts/speed_floor.py` reuse the training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import variants
from moe_bench.bench import hf_peer
from moe_bench.isocompute import dense_reference
from moe_bench.timing import peak_memory
from variants.compute.assignments import Routing
from variants.compute.backends import Computed
from variants.compute.experts import ExpertBank

NUM_TOKENS, D_MODEL = 4096, 512
NUM_THREADS = 2  # the CI machine's cores; the goals are stated for 2 threads
WARMUP_ROUNDS = 1  # untimed steps of each layer before timing (allocator growth, caches)
SIZES: dict[str, dict[str, Any]] = {
    "fine": {"num_experts": 64, "expert_hidden": 128, "top_k": 8},
    "coarse": {"num_experts": 8, "expert_hidden": 1024, "top_k": 2},
    "quick": {"num_experts": 64, "expert_hidden": 32, "top_k": 8, "num_shared_experts": 1},
}
ACTIVATION = "swiglu"
# (tokens, model width) of a size where not the default
SHAPES: dict[str, tuple[int, int]] = {"quick": (2048, 128)}


# the default test run (benchmarks disabled) runs every case once as a smoke test on this many
# tokens: same layers, a fraction of the work; the benchmark run times the full sizes
SMOKE_TOKENS = 256


def shape(size: str, smoke: bool = False) -> tuple[int, int]:
    """(T, D) of a size; `smoke`: at most SMOKE_TOKENS tokens (the default test run)."""
    T, D = SHAPES.get(size, (NUM_TOKENS, D_MODEL))
    return (min(T, SMOKE_TOKENS) if smoke else T), D


# `padded` needs capacity buffers; 1.25 is Switch's default (some assignments drop).
PADDED_CAPACITY_FACTOR = 1.25
HF_STYLE = "hf_style"  # the fake backend below, benchmarked next to the real ones
HF_PEER = ("hf_deepseek_v2", "grouped_mm")  # (variant, backend) of HF transformers' block
HF_SIZES = ("quick", "fine")  # its fine-grained sizes


@dataclass(frozen=True)
class Case:
    size: str
    variant: str
    backend: str

    @property
    def id(self) -> str:
        return f"{self.size}-{self.variant}-{self.backend}"


def _cases() -> list[Case]:
    """Dense reference first in each size (the others' `ratio_to_dense` reads its time)."""
    out = []
    for size in SIZES:
        out.append(Case(size, "dense", "dense"))
        for backend in ("grouped", "loop", HF_STYLE, "padded"):
            out.append(Case(size, "deepseek_moe", backend))
        if size in HF_SIZES:
            out.append(Case(size, *HF_PEER))
        if size == "quick":  # the quick sweep's fine-grained layer only
            continue
        # mixtral is dropless only: no padded; its HF path is not the repeat_interleave one
        out.extend(Case(size, "mixtral", b) for b in ("grouped", "loop"))
    return out


CASES = _cases()


def hf_style(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> Computed:
    """The HuggingFace DeepseekMoE training path (modeling_deepseek.py, `DeepseekMoE.forward`).

    `x.repeat_interleave(K)`, then per expert `y[flat_idx == i] = expert(x[flat_idx == i])`,
    then the weighted sum over the K copies. Needs token-major top-K routing (A = T*K, every
    token keeps K assignments), which dropless top-K routers produce.
    """
    T, D = x_TD.shape
    K = routing.expert.numel() // T
    flat_idx_A = routing.expert
    x_AD = x_TD.repeat_interleave(K, dim=0)
    y_AD = torch.empty_like(x_AD)
    for i in range(bank.num_experts):
        y_AD[flat_idx_A == i] = bank.expert_ffn(i, x_AD[flat_idx_A == i])
    weight_TK1 = routing.weight.view(T, K, 1).to(x_TD.dtype)
    return Computed((y_AD.view(T, K, D) * weight_TK1).sum(dim=1), HF_STYLE)


def moe_fields(case: Case) -> dict[str, Any]:
    size = SIZES[case.size]
    fields: dict[str, Any] = {
        "d_model": shape(case.size)[1],
        "num_shared_experts": 0,
        "activation": ACTIVATION,
        **size,
    }
    if case.backend == "padded":
        fields["capacity_factor"] = PADDED_CAPACITY_FACTOR
    return fields


def moe_config(size: str) -> variants.MoEConfig:
    """The fine-grained layer's config of a size: what the dense reference matches in active
    FLOPs, and what the HF peer computes."""
    return variants.make_config("deepseek_moe", **moe_fields(Case(size, "", "")))


def build_layer(case: Case) -> nn.Module:
    """The layer a case times, with fixed initial weights (seeded)."""
    torch.manual_seed(0)
    if (case.variant, case.backend) == HF_PEER:
        f = moe_fields(case)
        return hf_peer.HFDeepseekV2MoE(
            f["d_model"],
            f["num_experts"],
            f["expert_hidden"],
            f["top_k"],
            f["num_shared_experts"],
            implementation=case.backend,
        )
    if case.variant == "dense":
        return variants.build("dense", **dense_reference(moe_config(case.size)))
    backend = "grouped" if case.backend == HF_STYLE else case.backend
    layer = variants.build(case.variant, backend=backend, **moe_fields(case))
    if case.backend == HF_STYLE:
        layer.backend = hf_style
    return layer.train()


def make_inputs(size: str = "fine", smoke: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_TD leaf that wants a gradient, fixed upstream gradient of y) of a size."""
    T, D = shape(size, smoke)
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, D, generator=g).requires_grad_()
    return x_TD, torch.randn(T, D, generator=g)


def training_step(
    layer: nn.Module, x_TD: torch.Tensor, grad_TD: torch.Tensor, fresh_grads: bool = True
) -> Callable[[], Any]:
    """One forward+backward. `fresh_grads`: set gradients to None first, as a training loop
    does; otherwise they accumulate into the existing ones (so those stay resident)."""

    def step() -> variants.MoEOutput:
        if fresh_grads:
            layer.zero_grad(set_to_none=True)
            x_TD.grad = None
        out = layer(x_TD)
        roots, grads = [out.y], [grad_TD]
        if out.aux_loss.requires_grad:  # dense has no aux loss
            roots.append(out.aux_loss)
            grads.append(torch.ones_like(out.aux_loss))
        torch.autograd.backward(roots, grads)
        return out

    return step


def step_peak_bytes(layer: nn.Module, x_TD: torch.Tensor, grad_TD: torch.Tensor) -> int:
    """Peak tensor bytes of one forward+backward above the resident parameters, input and their
    gradients (those scale with total parameters, MoE's point; the rest is activations, dispatch
    buffers and transient gradients, which a dispatch implementation controls)."""
    step = training_step(layer, x_TD, grad_TD, fresh_grads=False)
    step()  # every gradient exists from here on
    params = list(layer.parameters())
    resident = [x_TD, x_TD.grad, *params, *(p.grad for p in params if p.grad is not None)]
    device = x_TD.device
    return peak_memory(step, device, resident) - peak_memory(lambda: None, device, resident)
