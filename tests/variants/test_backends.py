"""Every backend matches the `loop` reference in outputs and in gradients.

Two levels: backends alone on hand-built routings (empty experts, all tokens on one expert,
nothing kept), and whole layers of every variant on every backend that fits.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

import variants
from variants.compute.backends import BACKENDS, grouped
from variants.compute.experts import ExpertBank
from variants.parallel.expert_parallel import LOCAL_BACKENDS

from .helpers import feed_token_ids, hand_routing

FAST = [b for b in BACKENDS if b not in ("loop", "megablocks")]
# the CUDA path of `grouped`, checked here on CPU (grouped_mm runs there too), and each of its
# CPU paths forced (the rule picks one per call)
PATHS = {f"grouped_{p}": partial(grouped, path=p) for p in ("per_expert", "padded_bmm")}
IMPLEMENTATIONS = {**BACKENDS, "grouped_mm": partial(grouped, use_grouped_mm=True), **PATHS}
T, E, D, H = 12, 4, 16, 24


def _routings() -> dict[str, dict]:
    g = torch.Generator().manual_seed(1)
    expert_TK = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    return {
        "random_top2": dict(
            token=torch.arange(T).repeat_interleave(2).tolist(),
            expert=expert_TK.flatten().tolist(),
            weight=torch.rand(2 * T, generator=g).tolist(),
        ),
        "empty_experts": dict(  # experts 1 and 3 receive nothing
            token=list(range(T)) + list(range(0, T, 2)),
            expert=[0, 2] * (T // 2) + [2] * (T // 2),
            weight=torch.rand(T + T // 2, generator=g).tolist(),
        ),
        "all_on_one": dict(token=list(range(T)), expert=[3] * T, weight=[0.5] * T),
        "token_dropped": dict(token=[0, 0, 5], expert=[1, 2, 1], weight=[0.3, 0.7, 1.0]),
        "nothing_kept": dict(token=[], expert=[], weight=[]),
    }


def _run(backend: str, bank: ExpertBank, x_TD: torch.Tensor, spec: dict):
    bank = copy.deepcopy(bank)
    x_TD = x_TD.clone().requires_grad_()
    routing = hand_routing(**spec, num_tokens=T, num_experts=E)
    if backend == "padded":
        routing.capacity = int(routing.load.max()) if routing.expert.numel() else 1
    y_TD = IMPLEMENTATIONS[backend](x_TD, routing, bank).y_TD
    y_TD.backward(torch.randn(y_TD.shape, generator=torch.Generator().manual_seed(2)))
    grads = {"x": x_TD.grad, "weight": routing.weight.grad}
    grads.update({n: p.grad for n, p in bank.named_parameters()})
    return y_TD.detach(), grads


@pytest.mark.parametrize("backend", [*FAST, "grouped_mm", *PATHS, "grouped_padded_bmm_groups"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", list(_routings()))
def test_backend_matches_loop_on_hand_routings(
    backend: str, activation: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _routings()[case]
    if backend == "grouped_padded_bmm_groups":  # bmm groups of 3 experts: [0, 3), [3, 4)
        largest = max(spec["expert"].count(e) for e in range(E)) if spec["expert"] else 1
        monkeypatch.setattr("variants.compute.dispatch.GROUP_ROWS", 3 * largest)
        backend = "grouped_padded_bmm"
    bank = ExpertBank(E, D, H, activation)
    x_TD = torch.randn(T, D)
    y_ref, g_ref = _run("loop", bank, x_TD, spec)
    y, g = _run(backend, bank, x_TD, spec)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        if g_ref[name] is None:  # no assignment -> no path to the combine weights
            assert g[name] is None or not g[name].abs().any(), name
            continue
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_untouched_tokens_get_zero_and_dropped_token_rows_are_exact() -> None:
    bank = ExpertBank(E, D, H, "gelu")
    x_TD = torch.randn(T, D)
    y, _ = _run("loop", bank, x_TD, _routings()["token_dropped"])
    assert not y[1:5].any() and not y[6:].any()
    with torch.no_grad():
        expected_0 = 0.3 * bank.expert_ffn(1, x_TD[:1]) + 0.7 * bank.expert_ffn(2, x_TD[:1])
    torch.testing.assert_close(y[:1], expected_0)


# Qwen2-MoE options on the DeepSeekMoE family
QWEN = {"shared_gate": True, "shared_hidden": 16, "norm_topk_prob": True}
V2 = {"num_experts": 8, "top_k": 3, "num_devices": 4, "max_devices": 2}
# (variant, extra fields): every variant, sized so grouped_mm's alignment holds.
LAYER_CASES = [
    ("dense", {}),
    ("switch", {"num_experts": 4}),
    ("switch", {"num_experts": 4, "capacity_factor": 0.5}),  # forces drops
    ("gshard", {"num_experts": 4}),
    ("deepseek_moe", {"num_experts": 6, "top_k": 3, "num_shared_experts": 2}),
    ("deepseek_moe", {"num_experts": 6, "top_k": 2, "capacity_factor": 1.0}),
    ("deepseek_v3", {"num_experts": 8, "top_k": 4, "num_groups": 4, "topk_groups": 2}),
    ("deepseek_v2", {**V2, "num_shared_experts": 1}),
    ("deepseek_v2", {**V2, "capacity_factor": 0.5}),  # device budget forces drops
    ("mixtral", {"num_experts": 4, "num_shared_experts": 1}),
    ("expert_choice", {"num_experts": 4, "num_shared_experts": 1}),
    ("expert_choice", {"num_experts": 4, "selection_scope": "position"}),
    ("noisy_topk", {"num_experts": 4, "top_k": 2, "num_shared_experts": 1}),
    ("deepseek_moe", {**QWEN, "num_experts": 6, "top_k": 3, "num_shared_experts": 2}),
    ("deepseek_v2", {**QWEN, **V2, "num_shared_experts": 1}),
    ("deepseek_v3", {**QWEN, "num_experts": 8, "top_k": 2, "num_groups": 1, "topk_groups": 1}),
    ("topp", {"num_experts": 4}),
    ("topp", {"num_experts": 4, "top_p": 0.9, "num_shared_experts": 1}),
    ("remoe", {"num_experts": 4, "num_shared_experts": 1}),
    ("moe_plus_plus", {"num_experts": 4}),
    ("moe_plus_plus", {"num_experts": 4, "top_k": 3, "num_shared_experts": 1}),
    ("sinkhorn", {"num_experts": 4}),
    ("sinkhorn", {"num_experts": 4, "top_k": 2, "capacity_factor": 0.5}),  # forces drops
    ("xmoe", {"num_experts": 4}),
    ("xmoe", {"num_experts": 4, "top_k": 2, "capacity_factor": 0.5}),
    ("qwen3_next", {"num_experts": 6, "top_k": 3, "shared_hidden": 12}),
    ("phimoe", {"num_experts": 4}),
    ("gpt_oss", {"num_experts": 4, "top_k": 2}),  # expert biases with gelu or swiglu
    ("llama4", {"num_experts": 4, "top_k": 2}),  # the weight on the expert's input
    ("deepseek_v3", {"num_experts": 8, "top_k": 2, "num_groups": 1, "score": "softmax"}),
    ("deepseek_v4", {"num_experts": 8, "top_k": 3, "num_shared_experts": 1}),
    ("hash", {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "vocab_size": 7}),
    # scale 1 (the model: 6) keeps gradients at the other cases' size for the 1e-5 tolerance
    (
        "longcat_flash",
        {"num_experts": 4, "top_k": 3, "num_identity_experts": 2, "routed_scaling_factor": 1.0},
    ),
]


def _layer_fits(name: str, fields: dict, backend: str) -> bool:
    try:
        variants.make_config(name, backend=backend, **fields)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize(("name", "fields"), LAYER_CASES)
def test_layer_backend_matches_loop(name: str, fields: dict, activation: str, backend: str) -> None:
    if not _layer_fits(name, fields, backend):
        pytest.skip(f"{name} with {fields} does not fit backend {backend} (a clear ValueError)")
    common = dict(d_model=16, expert_hidden=8, activation=activation, **fields)
    ref = feed_token_ids(variants.build(name, backend="loop", **common)).train()
    other = feed_token_ids(variants.build(name, backend=backend, **common)).train()
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 16)
    outs = []
    for layer in (ref, other):
        torch.manual_seed(3)  # identical random draws (GShard's second choice) in both
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (out.y.square().sum() + out.aux_loss).backward()
        outs.append((out, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (o_ref, gx_ref, gp_ref), (o, gx, gp) = outs
    assert torch.equal(o.routing.expert, o_ref.routing.expert)
    torch.testing.assert_close(o.y, o_ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert gp_ref.keys() == gp.keys()
    for n in gp_ref:
        torch.testing.assert_close(gp[n], gp_ref[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("backend", FAST)
def test_backends_run_under_bf16_autocast(backend: str) -> None:
    """One compute dtype inside every backend: autocast's, like the loop reference."""
    fields = dict(d_model=16, num_experts=4, expert_hidden=8, capacity_factor=2.0)
    ref = variants.build("deepseek_moe", top_k=2, **fields)
    other = variants.build("deepseek_moe", top_k=2, backend=backend, **fields)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x).y, other(x).y
    y.sum().backward()
    assert y.dtype == y_ref.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None for p in other.experts.parameters())


@pytest.mark.parametrize("path", ["per_expert", "padded_bmm", None])
def test_grouped_returns_the_path_that_ran(path: str | None) -> None:
    bank = ExpertBank(E, D, H, "swiglu")
    routing = hand_routing(**_routings()["random_top2"], num_tokens=T, num_experts=E)
    ran = grouped(torch.randn(T, D), routing, bank, path=path).path
    assert ran in ("per_expert", "padded_bmm")
    if path is not None:
        assert ran == path
    assert not hasattr(routing, "dispatch_path")  # the record stays what the router made


@pytest.mark.parametrize(
    ("backend", "paths"),
    [("loop", {"loop"}), ("padded", {"padded"}), ("grouped", {"per_expert", "padded_bmm"})],
)
def test_layer_reports_the_path_its_backend_ran(backend: str, paths: set[str]) -> None:
    layer = variants.build(
        "switch", d_model=D, num_experts=E, expert_hidden=H, backend=backend, capacity_factor=2.0
    )
    assert layer(torch.randn(T, D)).dispatch_path in paths
    assert variants.build("dense", d_model=D)(torch.randn(T, D)).dispatch_path is None


def test_backend_specs_are_the_one_list_expert_parallelism_reads() -> None:
    assert tuple(n for n, spec in BACKENDS.items() if spec.expert_parallel) == LOCAL_BACKENDS
    assert set(LOCAL_BACKENDS) == {"loop", "grouped"}


def test_a_refusal_names_the_backends_that_can_compute_it() -> None:
    """The alternatives in a backend's refusal come from BACKENDS, so a new backend that can
    compute the config is offered without editing the message."""
    dropless = [f"'{n}'" for n, spec in BACKENDS.items() if spec.capacity != "required"]
    with pytest.raises(ValueError, match="capacity_factor=None") as err:
        variants.make_config("switch", d_model=8, num_experts=4, expert_hidden=8,
                             backend="padded", capacity_factor=None)  # fmt: skip
    assert (
        all(name in str(err.value) for name in dropless)
        and "'padded'" not in str(err.value).split("use ")[-1]
    )
