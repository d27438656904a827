"""The benchmarked layers compute what `loop` computes, so their timings compare like with like.

The HF-style fake is a baseline only if it is right; `grouped` is checked here at the benchmark's
expert counts (E=64, K=8 and E=8, K=2) with fewer tokens, on top of the parity suite's tiny cases.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_bench.bench.cases import HF_STYLE, SIZES, Case, build_layer, hf_style
from tests.slow_cases import some_slow
from variants.compute.backends import BACKENDS

FAKES = {HF_STYLE: hf_style, "grouped": BACKENDS["grouped"]}


# fine (E=64, K=8): seconds a case, with `loop` stepping 64 experts; the slow run checks it
@pytest.mark.parametrize("size", some_slow(SIZES, ["fine"]))
@pytest.mark.parametrize("backend", list(FAKES))
def test_backend_matches_loop_at_benchmark_expert_counts(size: str, backend: str) -> None:
    ref = build_layer(Case(size, "deepseek_moe", "loop"))
    other = copy.deepcopy(ref)
    other.backend = FAKES[backend]
    x, grad_y = torch.randn(2, 128, ref.cfg.d_model)
    results = []
    for layer in (ref, other):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        ((out.y * grad_y).sum() + out.aux_loss).backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results.append((out.y.detach(), xi.grad, grads))
    (y_ref, gx_ref, gp_ref), (y, gx, gp) = results
    for name, got, want in [("y", y, y_ref), ("x", gx, gx_ref)] + [
        (n, gp[n], gp_ref[n]) for n in gp_ref
    ]:
        # float32 sums in another order: tolerance relative to the tensor's scale
        atol = 1e-6 * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=name)
