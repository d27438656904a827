"""Peers: megablocks' dMoE as a row beside our variants.

On CPU a tiny fake of megablocks.layers (Arguments with the real 0.10.0 field names, a dMoE with
LearnedRouter's semantics and GroupedMLP's weight layout, the module-level load-balancing list)
checks the config mapping, the wrapper's MoEOutput, routing and loss plumbing, and the error
paths. Tests marked `gpu` build the real dMoE (`pytest -m gpu`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import variants
from moe_bench import components, peers, results
from variants.compute.backends import loop
from variants.compute.experts import ExpertBank

T, E, D, H = 24, 4, 16, 8
BF16 = torch.bfloat16  # the peer computes in bfloat16 only (grouped_gemm)

# megablocks 0.10.0 layers/arguments.py: every field of Arguments, by name
ARGUMENT_FIELDS = [
    "hidden_size",
    "ffn_hidden_size",
    "num_layers",
    "bias",
    "return_bias",
    "activation_fn",
    "moe_num_experts",
    "moe_top_k",
    "moe_capacity_factor",
    "moe_normalize_expert_weights",
    "moe_loss_weight",
    "moe_jitter_eps",
    "moe_lbl_in_fp32",
    "moe_expert_model_parallelism",
    "expert_parallel_group",
    "pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage",
    "memory_optimized_mlp",
    "mlp_type",
    "mlp_impl",
    "fp16",
    "bf16",
    "device",
    "init_method",
    "output_layer_init_method",
    "uniform_expert_assignment",
    "shared_expert",
    "fc_cls",
    "fc_kwargs",
    "remat_act_fn",
    "shared_expert_hidden_size",
    "shared_expert_weighted_sum",
    "moe_zloss_weight",
    "moe_zloss_in_fp32",
]
FakeArguments = dataclasses.make_dataclass(
    "FakeArguments", [(name, Any, dataclasses.field(default=None)) for name in ARGUMENT_FIELDS]
)


def fake_lbl_module() -> types.ModuleType:
    """megablocks.layers.moe's load-balancing list and its reduction (same formula and checks)."""
    lbl = types.ModuleType("megablocks.layers.moe")
    lbl.entries = []
    lbl.save_load_balancing_loss = lbl.entries.append
    lbl.get_load_balancing_loss = lambda: lbl.entries
    lbl.clear_load_balancing_loss = lbl.entries.clear

    def batched_load_balancing_loss(args):
        tokens_per_expert, scores = zip(*lbl.entries)
        if len(tokens_per_expert) != args.num_layers:
            raise ValueError(f"Expected {args.num_layers} token_per_experts")
        scores = torch.cat(scores, dim=1).float()
        tokens = scores.shape[0]
        scale = (
            args.moe_num_experts
            * args.moe_loss_weight
            / (args.num_layers * tokens * args.moe_top_k)
        )
        return scale * torch.dot(torch.cat(tokens_per_expert).float(), scores.mean(0))

    lbl.batched_load_balancing_loss = batched_load_balancing_loss
    return lbl


class FakeRouter(nn.Module):
    """LearnedRouter: softmax of x @ layer.weight.T, top-k, optional p-norm, uniform option."""

    def __init__(self, args) -> None:
        super().__init__()
        self.args = args
        self.layer = nn.Linear(args.hidden_size, args.moe_num_experts, bias=False)

    def forward(self, x):
        a = self.args
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        weights, experts = torch.topk(scores, a.moe_top_k, dim=-1)
        if a.moe_normalize_expert_weights:
            p = a.moe_normalize_expert_weights
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
        if a.uniform_expert_assignment:
            experts = (torch.arange(experts.numel()) % a.moe_num_experts).view(experts.shape)
        return scores, weights, experts


class FakeDMoE(nn.Module):
    """dMoE with GroupedMLP/GroupedGLU's weight layout: w1, v1, w2 as [E*H, D], w1 and v1 used
    transposed."""

    def __init__(self, args, lbl: types.ModuleType) -> None:
        super().__init__()
        self.args, self.lbl = args, lbl
        self.router = FakeRouter(args)
        self.experts = nn.Module()
        self.experts.args = args
        self.experts.mlp = nn.Module()
        rows = args.moe_num_experts * args.ffn_hidden_size
        for name in ("w1", "w2", *(("v1",) if args.mlp_type == "glu" else ())):
            setattr(self.experts.mlp, name, nn.Parameter(torch.randn(rows, args.hidden_size)))

    def forward(self, x):
        a, mlp = self.args, self.experts.mlp
        scores, weights, experts = self.router(x)
        x_TD = x.view(-1, a.hidden_size)
        y_TD = torch.zeros_like(x_TD)
        view = lambda w: w.view(a.moe_num_experts, -1, a.hidden_size)
        for e in range(a.moe_num_experts):
            t, k = torch.nonzero(experts == e, as_tuple=True)
            h = a.activation_fn(x_TD[t] @ view(mlp.w1)[e].T)
            if a.mlp_type == "glu":
                h = h * (x_TD[t] @ view(mlp.v1)[e].T)
            y_TD = y_TD.index_add(0, t, (h @ view(mlp.w2)[e]) * weights[t, k, None])
        if self.training and a.moe_loss_weight > 0:
            tokens_per_expert = torch.bincount(experts.flatten(), minlength=a.moe_num_experts)
            self.lbl.save_load_balancing_loss((tokens_per_expert, scores))
        return y_TD.view(x.shape)


@pytest.fixture
def fake_megablocks(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The fake installed as `megablocks`, with CUDA pretended present; returns its lbl module."""
    lbl = fake_lbl_module()
    modules = {name: types.ModuleType(name) for name in (
        "megablocks", "megablocks.grouped_gemm_util", "megablocks.layers",
        "megablocks.layers.arguments", "megablocks.layers.dmoe",
    )}  # fmt: skip
    modules["megablocks.layers.moe"] = lbl
    modules["megablocks.grouped_gemm_util"].ops = types.SimpleNamespace(gmm=None)
    modules["megablocks"].grouped_gemm_util = modules["megablocks.grouped_gemm_util"]
    modules["megablocks"].layers = modules["megablocks.layers"]
    modules["megablocks.layers"].moe = lbl
    modules["megablocks.layers.arguments"].Arguments = FakeArguments
    modules["megablocks.layers.dmoe"].dMoE = lambda args: FakeDMoE(args, lbl)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return lbl


MB = components.lookup("megablocks_dmoe")


def build_peer(
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, **fields
) -> peers.MegablocksDMoE:
    return MB.build(MB.make_config(**fields), torch.device(device), dtype)


def build_fake(**fields) -> peers.MegablocksDMoE:
    sizes = dict(d_model=D, num_experts=E, expert_hidden=H, top_k=2)
    return build_peer(device="cpu", **{**sizes, **fields})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def bank_from_dmoe(moe: nn.Module) -> ExpertBank:
    """Our ExpertBank holding a dMoE's expert weights: [E*H, D] -> w1/w3 [E, D, H], w2 [E, H, D]."""
    a, mlp = moe.experts.args, moe.experts.mlp  # ParallelDroplessMLP keeps the Arguments
    glu = a.mlp_type == "glu"
    bank = ExpertBank(a.moe_num_experts, a.hidden_size, a.ffn_hidden_size,
                      "swiglu" if glu else "gelu").to(mlp.w1.device, mlp.w1.dtype)  # fmt: skip
    view = lambda w: w.detach().view(a.moe_num_experts, a.ffn_hidden_size, a.hidden_size)
    with torch.no_grad():
        bank.w1.copy_(view(mlp.w1).transpose(1, 2))
        bank.w2.copy_(view(mlp.w2))
        if glu:
            bank.w3.copy_(view(mlp.v1).transpose(1, 2))
    return bank


# ---------------------------------------------------------------------------------------------
# CPU: config mapping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation, mlp_type", [("gelu", "mlp"), ("swiglu", "glu")])
def test_fields_map_to_megablocks_arguments(activation: str, mlp_type: str) -> None:
    cfg = MB.make_config(
        d_model=64, num_experts=16, expert_hidden=32, top_k=3,
        num_shared_experts=2, activation=activation, force_uniform_routing=True,
        balance_coef=0.02, normalize_expert_weights=1.0,
    )  # fmt: skip
    args = peers.megablocks_arguments(cfg, "cuda", torch.bfloat16)
    assert set(args) <= set(ARGUMENT_FIELDS), set(args) - set(ARGUMENT_FIELDS)
    expected = dict(
        hidden_size=64, ffn_hidden_size=32, moe_num_experts=16, moe_top_k=3,
        mlp_type=mlp_type, mlp_impl="grouped", moe_loss_weight=0.02,
        moe_normalize_expert_weights=1.0, uniform_expert_assignment=True, shared_expert=True,
        shared_expert_hidden_size=64, bias=False, return_bias=False, num_layers=1,
        bf16=True, fp16=False, device="cuda",
    )  # fmt: skip
    assert {k: args[k] for k in expected} == expected


def test_gelu_is_exact_not_megablocks_tanh_default() -> None:
    x = torch.linspace(-4, 4, 101)
    cfg = MB.make_config(d_model=D, num_experts=E, expert_hidden=H)
    act = peers.megablocks_arguments(cfg, "cuda", torch.bfloat16)["activation_fn"]
    torch.testing.assert_close(act(x), F.gelu(x))
    assert not torch.allclose(act(x), F.gelu(x, approximate="tanh"), atol=1e-6, rtol=0)


def test_swiglu_gate_is_silu() -> None:
    x = torch.linspace(-4, 4, 101)
    cfg = MB.make_config(d_model=D, num_experts=E, expert_hidden=H,
                            activation="swiglu")  # fmt: skip
    torch.testing.assert_close(
        peers.megablocks_arguments(cfg, "cuda", torch.bfloat16)["activation_fn"](x), F.silu(x)
    )


def test_no_shared_expert_by_default() -> None:
    cfg = MB.make_config(d_model=D, num_experts=E, expert_hidden=H)
    args = peers.megablocks_arguments(cfg, "cuda", torch.bfloat16)
    assert args["shared_expert"] is False and args["shared_expert_hidden_size"] is None


# ---------------------------------------------------------------------------------------------
# CPU: the wrapper on the fake
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_wrapper_returns_moe_output_with_routing(fake_megablocks, activation: str) -> None:
    peer = build_fake(activation=activation).train()
    x = torch.randn(2, T // 2, D, dtype=BF16)
    out = peer(x)
    assert out.y.shape == x.shape
    r = out.routing
    assert r.num_tokens == T and r.token.tolist() == torch.arange(T).repeat_interleave(2).tolist()
    assert int(r.load.sum()) == 2 * T and torch.equal(r.demand, r.load)
    torch.testing.assert_close(r.logits, x.view(T, D) @ peer.moe.router.layer.weight.T)
    torch.testing.assert_close(r.scores.float().sum(-1), torch.ones(T), atol=1e-2, rtol=0)
    # the captured routing and the weight layout reproduce the peer's output through `loop`
    ref = loop(x.view(T, D), r, bank_from_dmoe(peer.moe)).y_TD
    assert rel_err(out.y.view(T, D), ref) < 2e-2


def test_balance_loss_is_megablocks_and_mixtral_form(fake_megablocks) -> None:
    peer = build_fake(balance_coef=0.05).train()
    fake_megablocks.entries.append(("left over", "by someone else"))  # cleared before forward
    out = peer(torch.randn(T, D, dtype=BF16))
    r = out.routing
    f_E = r.load.float() / (T * 2)
    expected = 0.05 * E * (f_E * r.scores.float().mean(0)).sum()
    torch.testing.assert_close(out.losses["balance"], expected)
    torch.testing.assert_close(out.aux_loss, expected)
    assert fake_megablocks.entries == []  # read and cleared: no state outlives the call
    out.aux_loss.backward()
    assert peer.moe.router.layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["eval", "coef_zero"])
def test_no_loss_in_eval_or_at_zero_coefficient(fake_megablocks, mode: str) -> None:
    peer = build_fake(balance_coef=0.0).train() if mode == "coef_zero" else build_fake().eval()
    out = peer(torch.randn(T, D, dtype=BF16))
    assert out.losses == {} and float(out.aux_loss) == 0.0
    assert fake_megablocks.entries == []


def test_uniform_routing_reaches_megablocks(fake_megablocks) -> None:
    out = build_fake(force_uniform_routing=True).eval()(torch.randn(T, D, dtype=BF16))
    assert out.routing.load.tolist() == [T * 2 // E] * E


def test_update_bias_is_a_no_op(fake_megablocks) -> None:
    peer = build_fake()
    before = {k: v.clone() for k, v in peer.state_dict().items()}
    peer.update_bias()
    assert all(torch.equal(v, before[k]) for k, v in peer.state_dict().items())


# ---------------------------------------------------------------------------------------------
# CPU: error paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_no_cuda_names_the_peer() -> None:
    with pytest.raises(RuntimeError, match=r"variant 'megablocks_dmoe' needs a CUDA device"):
        build_peer(d_model=D, num_experts=E, expert_hidden=H)


def test_missing_package_gives_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "megablocks", None)
    with pytest.raises(RuntimeError, match=r"megablocks_dmoe' needs the megablocks package.*pip"):
        build_peer(d_model=D, num_experts=E, expert_hidden=H)


def test_float32_is_refused(fake_megablocks) -> None:
    with pytest.raises(ValueError, match=r"megablocks_dmoe' computes with grouped_gemm.*bfloat16"):
        build_fake(dtype=torch.float32)


@pytest.mark.parametrize(
    "name, fields, match",
    [
        ("nope", {}, r"variant='nope' is not one of .*'megablocks_dmoe'"),
        ("megablocks_dmoe", dict(capacity_factor=1.0), r"capacity_factor=1.0 must be None"),
        ("megablocks_dmoe", dict(balance_coef=-1), r"balance_coef=-1 must be >= 0"),
        ("megablocks_dmoe", dict(top_k=9), r"top_k=9 must be <= num_experts=4"),
        ("megablocks_dmoe", dict(jitter=0.1), r"jitter=0.1 is not a field"),
    ],
)
def test_bad_config_is_a_clear_value_error(name: str, fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        components.lookup(name).make_config(d_model=D, num_experts=E, expert_hidden=H, **fields)


# ---------------------------------------------------------------------------------------------
# GPU: the real dMoE (pytest -m gpu)
# ---------------------------------------------------------------------------------------------


def _real_peer(**fields) -> peers.MegablocksDMoE:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("megablocks")
    sizes = dict(d_model=256, num_experts=8, expert_hidden=256, top_k=2)
    return build_peer(**{**sizes, **fields})


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gpu_peer_matches_loop_on_its_own_routing(activation: str) -> None:
    peer = _real_peer(activation=activation).train()
    x = torch.randn(4, 128, 256, device="cuda", dtype=BF16, requires_grad=True)
    out = peer(x)
    x_TD = x.detach().view(-1, 256)
    ref = loop(x_TD, out.routing, bank_from_dmoe(peer.moe)).y_TD
    assert rel_err(out.y.view_as(ref), ref) < 2e-2
    assert out.losses["balance"].isfinite() and float(out.aux_loss) > 0
    torch.autograd.backward([out.y, out.aux_loss], [torch.randn_like(out.y), None])
    assert all(p.grad is not None and p.grad.isfinite().all() for p in peer.parameters())


@pytest.mark.gpu
def test_gpu_peer_throughput_smoke() -> None:
    from moe_bench.tasks import STEPS
    from moe_bench.timing import time_steps

    peer = _real_peer()
    x = torch.randn(8, 256, 256, device="cuda", dtype=BF16)
    for pass_, step in STEPS.items():
        timing = time_steps(step(peer, x), torch.device("cuda"), warmup=2, repeats=3, desc=pass_)
        assert all(0 < ms < 10_000 for ms in timing.samples_ms), (pass_, timing.samples_ms)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("shared", [0, 2])
def test_param_counts_match_an_equal_shaped_variant(activation: str, shared: int) -> None:
    """dMoE's shapes are a softmax top-k layer's: counted like our own mixtral-shaped layer."""
    from moe_bench.isocompute import count_params

    fields = dict(
        d_model=16,
        num_experts=8,
        expert_hidden=24,
        top_k=2,
        activation=activation,
        num_shared_experts=shared,
    )
    assert peers.param_counts(MB.make_config(**fields)) == count_params(
        variants.build("mixtral", **fields)
    )


@pytest.mark.slow  # a subprocess run or several processes: the slow run
def test_runner_records_the_peer_as_a_failed_row_without_cuda(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU failure row")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_bench",
            "variant=megablocks_dmoe",
            "model=tiny",
            f"hydra.run.dir={tmp_path}",
            "device.threads=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "needs a CUDA device" in run.stderr
    rows, _ = results.read_rows(tmp_path)
    assert rows and all(r["status"] == "failed" for r in rows)
    assert rows[0]["params_total"] > rows[0]["params_active"] > 0
