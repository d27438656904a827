"""The megablocks backend adapter: index/bin/weight-layout logic on CPU, error paths, GPU parity.

On CPU a tiny fake of megablocks' ops and grouped_gemm's gmm, written in plain torch after the
kernels' documented semantics (megablocks 0.10.0 backend/kernels.py, grouped_gemm csrc), stands
in for the CUDA kernels, so the adapter's own logic is checked against the `loop` reference.
Tests marked `gpu` run the real kernels (deselected by default; `pytest -m gpu`).
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

import variants
from variants.compute import megablocks as mb
from variants.compute.backends import BACKENDS
from variants.compute.experts import ExpertBank

from .helpers import hand_routing

T, E, D, H = 12, 4, 16, 24

# ---------------------------------------------------------------------------------------------
# The fake: megablocks.ops and grouped_gemm's gmm in plain torch
# ---------------------------------------------------------------------------------------------


def fake_sort(x: torch.Tensor, end_bit: int) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dtype == torch.int32 and int(x.max()) < 2**end_bit  # a radix sort sees end_bit bits
    values, order = torch.sort(x, stable=True)  # CUB radix sort is stable
    return values, order.int()


def fake_histogram(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    return torch.bincount(x, minlength=num_bins).int()


def fake_inclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    # the real op views a vector as [1, n] and squeezes the result: one bin comes back 0-d
    return torch.cumsum(x.view(1, -1), 1).int().squeeze() if x.dim() == 1 else x.cumsum(dim)


def check_bins(bin_ids: torch.Tensor, bins: torch.Tensor) -> None:
    """The kernels' `assert_is_vector(bins)`, and bins bounding each expert's sorted rows."""
    assert bins.dim() == 1
    assert torch.equal(bins.long(), torch.bincount(bin_ids.long(), minlength=len(bins)).cumsum(0))


def fake_gather(x, indices, bin_ids, bins, top_k):
    assert indices.shape[0] == x.shape[0] * top_k  # the kernel's own shape check
    check_bins(bin_ids, bins)
    return x[indices.long() // top_k]


def fake_scatter(x, indices, bin_ids, weights, bins, top_k):
    check_bins(bin_ids, bins)
    tokens = indices.shape[0] // top_k
    idx = indices.long()
    rows = x * weights[idx, None]  # the weight of the assignment, read at its flat index
    out = x.new_zeros(tokens * top_k, x.shape[1]).index_copy(0, idx, rows)
    return out.view(tokens, top_k, -1).sum(1)


def fake_gmm(a, b, batch_sizes, trans_b=False):
    assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.long
    assert b.is_contiguous() and b.shape[0] == batch_sizes.shape[0]
    chunks = a.split(batch_sizes.tolist())
    return torch.cat([c @ (w.T if trans_b else w) for c, w in zip(chunks, b)])


FAKE_OPS = types.SimpleNamespace(
    sort=fake_sort,
    histogram=fake_histogram,
    inclusive_cumsum=fake_inclusive_cumsum,
    gather=fake_gather,
    scatter=fake_scatter,
)
FAKE = mb.Kernels(ops=FAKE_OPS, gmm=fake_gmm)


def install_fake_megablocks(monkeypatch: pytest.MonkeyPatch, grouped_gemm: bool = True) -> None:
    """Put the fake in sys.modules as the `megablocks` package and pretend CUDA is there."""
    package = types.ModuleType("megablocks")
    ops = types.ModuleType("megablocks.ops")
    vars(ops).update(vars(FAKE_OPS))
    gg = types.ModuleType("megablocks.grouped_gemm_util")
    gg.ops = types.SimpleNamespace(gmm=fake_gmm) if grouped_gemm else None
    package.ops, package.grouped_gemm_util = ops, gg
    for name, module in (("megablocks", package), ("megablocks.ops", ops)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "megablocks.grouped_gemm_util", gg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# ---------------------------------------------------------------------------------------------
# CPU: the adapter's logic against loop
# ---------------------------------------------------------------------------------------------


def _topk_spec(k: int, num_experts: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    expert_TK = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(T)])
    return dict(
        token=torch.arange(T).repeat_interleave(k).tolist(),
        expert=expert_TK.flatten().tolist(),
        weight=torch.rand(T * k, generator=g).tolist(),
        num_experts=num_experts,
    )


ROUTINGS = {
    "top1": _topk_spec(1, E, 1),
    "top2": _topk_spec(2, E, 2),
    "top3": _topk_spec(3, E, 3),
    "all_on_one": dict(token=list(range(T)), expert=[3] * T, weight=[0.5] * T, num_experts=E),
    "empty_experts": dict(  # experts 1 and 3 get nothing: zero-row groups in the grouped GEMM
        token=torch.arange(T).repeat_interleave(2).tolist(),
        expert=[0, 2] * T,
        weight=[0.25, 0.75] * T,
        num_experts=E,
    ),
    "one_expert": dict(token=list(range(T)), expert=[0] * T, weight=[1.0] * T, num_experts=1),
    "many_experts": _topk_spec(2, 64, 4),  # end_bit 6
}


def _run(backend, x_TD: torch.Tensor, bank: ExpertBank, spec: dict):
    """y and every gradient (input, combine weights, expert weights) of one backend."""
    bank, x_TD = copy.deepcopy(bank), x_TD.clone().requires_grad_()
    routing = hand_routing(**spec, num_tokens=T)
    y_TD = backend(x_TD, routing, bank)
    y_TD.backward(torch.randn(y_TD.shape, generator=torch.Generator().manual_seed(5)))
    grads = {"x": x_TD.grad, "weight": routing.weight.grad}
    grads.update({n: p.grad for n, p in bank.named_parameters()})
    return y_TD.detach(), grads


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", list(ROUTINGS))
def test_fake_kernels_match_loop(case: str, activation: str) -> None:
    spec = ROUTINGS[case]
    bank = ExpertBank(spec["num_experts"], D, H, activation)
    x_TD = torch.randn(T, D)
    y_ref, g_ref = _run(lambda *a: BACKENDS["loop"](*a).y_TD, x_TD, bank, spec)
    y, g = _run(lambda *a: mb.dropless_grouped(*a, FAKE), x_TD, bank, spec)
    torch.testing.assert_close(y, y_ref)
    assert y.abs().sum() > 0
    assert set(g) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=lambda m, n=name: f"grad {n}: {m}")


DROPLESS = {  # every variant whose routing fits megablocks, with the fields that make it so
    "switch": dict(capacity_factor=None),
    "gshard": dict(capacity_factor=None),  # eval only: training drops second choices
    "mixtral": {},
    "deepseek_moe": dict(top_k=3, num_shared_experts=1),
    "deepseek_v2": dict(capacity_factor=None, num_devices=2, max_devices=1, top_k=2),
    "deepseek_v3": dict(top_k=2, num_groups=2, topk_groups=1),
    "noisy_topk": dict(top_k=2),
    "sinkhorn": dict(top_k=2),
    "xmoe": dict(top_k=2),
}


@pytest.mark.parametrize("uniform", [False, True], ids=["routed", "uniform"])
@pytest.mark.parametrize("name", list(DROPLESS))
def test_every_dropless_variant_routing_computes_like_loop(name: str, uniform: bool) -> None:
    layer = variants.build(
        name, d_model=D, num_experts=E, expert_hidden=H, force_uniform_routing=uniform,
        **DROPLESS[name],
    )  # fmt: skip
    x_TD = torch.randn(2 * T, D)
    layer.eval()  # deterministic routing; training-mode drops are tested below
    with torch.no_grad():
        routing, _ = layer.router(x_TD)
        y_ref = BACKENDS["loop"](x_TD, routing, layer.experts).y_TD
        y = mb.dropless_grouped(x_TD, routing, layer.experts, FAKE)
    torch.testing.assert_close(y, y_ref)


def test_weights_are_passed_uncopied() -> None:
    """gmm receives the bank's own parameters: no per-forward layout copy."""
    bank = ExpertBank(E, D, H, "swiglu")
    seen = []

    def recording_gmm(a, b, batch_sizes, trans_b=False):
        seen.append((b, trans_b))
        return fake_gmm(a, b, batch_sizes, trans_b)

    routing = hand_routing(**ROUTINGS["top2"], num_tokens=T)
    mb.dropless_grouped(torch.randn(T, D), routing, bank, FAKE._replace(gmm=recording_gmm))
    assert [b for b, _ in seen] == [bank.w1, bank.w3, bank.w2]
    assert all(b is p for (b, _), p in zip(seen, (bank.w1, bank.w3, bank.w2)))
    assert not any(trans_b for _, trans_b in seen)


def test_no_tokens() -> None:
    routing = hand_routing([], [], [], num_tokens=0, num_experts=E)
    y = mb.dropless_grouped(torch.zeros(0, D), routing, ExpertBank(E, D, H, "gelu"), FAKE)
    assert y.shape == (0, D)


# ---------------------------------------------------------------------------------------------
# CPU: what megablocks cannot express, and missing CUDA / package
# ---------------------------------------------------------------------------------------------

RAGGED = {
    "token_dropped": dict(token=[0, 0, 5], expert=[1, 2, 1], weight=[0.3, 0.7, 1.0]),
    "uneven_counts": dict(token=[0, 0, 1], expert=[1, 2, 1], weight=[0.3, 0.7, 1.0]),
    "not_token_major": dict(token=[1, 0], expert=[1, 2], weight=[0.5, 0.5]),
}


@pytest.mark.parametrize("case", list(RAGGED))
def test_uneven_routing_is_refused(case: str) -> None:
    num_tokens = 2 if case == "not_token_major" else T
    routing = hand_routing(**RAGGED[case], num_tokens=num_tokens, num_experts=E)
    with pytest.raises(ValueError, match=r"backend='megablocks' needs every token to keep"):
        mb.dropless_grouped(torch.randn(num_tokens, D), routing, ExpertBank(E, D, H, "gelu"), FAKE)


def test_capacity_is_refused() -> None:
    routing = hand_routing(**ROUTINGS["top1"], num_tokens=T, capacity=4)
    with pytest.raises(ValueError, match=r"backend='megablocks'.*capacity=4.*capacity_factor=None"):
        mb.dropless_grouped(torch.randn(T, D), routing, ExpertBank(E, D, H, "gelu"), FAKE)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("gshard", dict(capacity_factor=None)),  # random second choice drops in training
        ("expert_choice", {}),  # a token keeps 0..E experts
    ],
)
def test_routings_megablocks_cannot_express_are_refused(name: str, fields: dict) -> None:
    layer = variants.build(name, d_model=D, num_experts=E, expert_hidden=H, **fields).train()
    routing, _ = layer.router(torch.randn(4 * T, D))
    with pytest.raises(ValueError, match=r"backend='megablocks'"):
        mb.dropless_grouped(torch.randn(4 * T, D), routing, layer.experts, FAKE)


def test_capacity_factor_is_refused_at_build() -> None:
    with pytest.raises(ValueError, match=r"capacity_factor=1.25 must be None.*megablocks"):
        variants.build("switch", d_model=D, num_experts=E, expert_hidden=H, backend="megablocks")


@pytest.mark.parametrize(("name", "why"), [("expert_choice", "0..E"), ("gshard", "at random")])
def test_uneven_top_k_variants_are_refused_at_build(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=rf"backend='megablocks' cannot compute.*{why}"):
        variants.build(name, d_model=D, num_experts=E, expert_hidden=H, backend="megablocks")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_no_cuda_names_the_backend() -> None:
    layer = variants.build(
        "mixtral", d_model=D, num_experts=E, expert_hidden=H, backend="megablocks"
    )
    with pytest.raises(RuntimeError, match=r"backend='megablocks' needs a CUDA device"):
        layer(torch.randn(T, D))


def test_missing_package_gives_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "megablocks", None)  # makes `import megablocks` fail
    with pytest.raises(RuntimeError, match=r"needs the megablocks package.*pip install"):
        mb.megablocks_forward(torch.randn(T, D), None, ExpertBank(E, D, H, "gelu"))


def test_missing_grouped_gemm_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_megablocks(monkeypatch, grouped_gemm=False)
    with pytest.raises(RuntimeError, match=r"needs grouped_gemm.*pip install"):
        mb.load_kernels()


def test_kernels_come_from_the_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_megablocks(monkeypatch)
    kernels = mb.load_kernels()
    assert kernels.ops is sys.modules["megablocks.ops"]
    assert kernels.gmm is fake_gmm


@pytest.mark.parametrize(
    "dtype, match",
    [
        (torch.float32, r"backend='megablocks' \(input\) computes with grouped_gemm.*bfloat16"),
        (torch.bfloat16, r"backend='megablocks' needs CUDA tensors, but input is on device=cpu"),
    ],
)
def test_tensors_are_checked_before_the_kernels(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, match: str
) -> None:
    install_fake_megablocks(monkeypatch)
    bank = ExpertBank(E, D, H, "gelu").to(dtype)
    routing = hand_routing(**ROUTINGS["top1"], num_tokens=T)
    with pytest.raises(ValueError, match=match):
        mb.megablocks_forward(torch.randn(T, D, dtype=dtype), routing, bank)


# ---------------------------------------------------------------------------------------------
# GPU: the real kernels (pytest -m gpu)
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_VARIANTS = {
    "mixtral": {},
    "switch": dict(capacity_factor=None),
    "deepseek_moe": dict(top_k=3, num_shared_experts=1),
}
GPU_SIZES = dict(d_model=64, num_experts=8, expert_hidden=128)


def _layer_step(name: str, backend: str, dtype: torch.dtype, activation: str, x: torch.Tensor):
    """y and every gradient (input, parameters) of a seeded layer's training step on CUDA."""
    torch.manual_seed(0)
    layer = variants.build(
        name, backend=backend, activation=activation, **GPU_SIZES, **GPU_VARIANTS[name]
    ).to("cuda", dtype)
    x = x.to("cuda", dtype).requires_grad_()
    out = layer(x)
    grad_y = torch.randn(out.y.shape, generator=torch.Generator(device="cuda").manual_seed(1),
                         device="cuda", dtype=dtype)  # fmt: skip
    torch.autograd.backward([out.y, out.aux_loss], [grad_y, torch.ones_like(out.aux_loss)])
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out.y.detach(), grads


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", ["grouped", "megablocks"])
@pytest.mark.parametrize("name", list(GPU_VARIANTS))
def test_gpu_backend_matches_loop(name: str, backend: str, dtype: torch.dtype, activation: str):
    if backend == "megablocks":
        pytest.importorskip("megablocks")
    x = torch.randn(4, 64, GPU_SIZES["d_model"])
    if backend == "megablocks" and dtype not in mb.GROUPED_GEMM_DTYPES:
        with pytest.raises(ValueError, match=r"bfloat16"):
            _layer_step(name, backend, dtype, activation, x)
        return
    y_ref, g_ref = _layer_step(name, "loop", dtype, activation, x)
    y, g = _layer_step(name, backend, dtype, activation, x)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert _rel_err(y, y_ref) < tol
    assert set(g) == set(g_ref)
    for n in g_ref:
        assert _rel_err(g[n], g_ref[n]) < tol, n


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["grouped", "megablocks"])
def test_gpu_throughput_smoke(backend: str) -> None:
    if backend == "megablocks":
        pytest.importorskip("megablocks")
    from moe_bench.tasks import STEPS
    from moe_bench.timing import time_steps

    layer = variants.build("mixtral", backend=backend, d_model=256, num_experts=8,
                           expert_hidden=512).to("cuda", torch.bfloat16)  # fmt: skip
    x = torch.randn(8, 256, 256, device="cuda", dtype=torch.bfloat16)
    device = torch.device("cuda")
    for pass_, step in STEPS.items():
        timing = time_steps(step(layer, x), device, warmup=2, repeats=3, desc=pass_)
        assert all(0 < ms < 10_000 for ms in timing.samples_ms), (pass_, timing.samples_ms)
