"""router_grad: topk (the plain top-K gradient) and default_moe (Panda et al. 2025's EMA
stand-in), checked by hand on tiny cases, for an unchanged forward and across backends."""

from __future__ import annotations

import math

import pytest
import torch

import variants
from tests.slow_cases import some_slow
from tests.variants.helpers import fit_losses, with_logits
from variants.contract.router_grad import DefaultMoE, TopK

TOKEN_CHOICE = (
    "switch", "gshard", "mixtral", "deepseek_moe", "deepseek_v2", "deepseek_v3", "noisy_topk",
    "xmoe", "sinkhorn",
)  # fmt: skip
SMALL = {"d_model": 8, "num_experts": 4, "expert_hidden": 6}


def small_fields(name: str) -> dict:
    fields = {**SMALL, "top_k": 1 if name == "switch" else 2}
    fields.update(
        {"deepseek_v2": {"num_devices": 2, "max_devices": 1},
         "deepseek_v3": {"num_groups": 2, "topk_groups": 1}}.get(name, {})
    )  # fmt: skip
    return fields


def test_bad_value_names_the_field_the_value_and_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"^router_grad='dense' is not one of 'topk', 'default_moe', 'sparsemixer'$",
    ):
        variants.make_config("mixtral", router_grad="dense")
    with pytest.raises(ValueError, match=r"^default_moe_decay=1.0 must be < 1$"):
        variants.make_config("mixtral", default_moe_decay=1.0)


def test_topk_is_the_default_and_passes_the_output_through_untouched() -> None:
    layer = variants.build("mixtral", **SMALL)
    assert layer.cfg.router_grad == "topk" and isinstance(layer.router_grad, TopK)
    y = torch.randn(5, 8)
    assert layer.router_grad(torch.randn(5, 8), None, y, layer.experts) is y
    # no buffer, so a topk layer's state (and any checkpoint of it) is what it was
    assert not any("default_output" in k for k in layer.state_dict())


def test_default_moe_stand_in_gradient_by_hand() -> None:
    """T=2 tokens, E=3, switch top-1: token 0 keeps expert 0, token 1 keeps expert 2, expert 1
    keeps none. Expert outputs are 0 (w2 = 0) and the balance loss is off, so with topk the
    router gets no gradient at all and with default_moe only the stand-in's:
    dL/ds_ti = g_t . D_i for unkept (t, i), then through softmax to the logits."""
    logits = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]
    d0 = [[1.0, 0.0], [2.0, -1.0], [0.0, 3.0]]  # the defaults before this forward
    g = [[1.0, 3.0], [-1.0, 1.0]]  # dL/dy: L = sum(g * y)
    decay = 0.5
    grads = {}
    for rg in ("topk", "default_moe"):
        layer, x = with_logits(
            "switch", torch.tensor(logits), capacity_factor=None, balance_coef=0.0,
            router_grad=rg, default_moe_decay=decay,
        )  # fmt: skip
        with torch.no_grad():
            layer.experts.w2.zero_()
            if rg == "default_moe":
                layer.router_grad.default_output.copy_(torch.tensor(d0))
        out = layer.train()(x)
        (out.y * torch.tensor(g)).sum().backward()
        grads[rg] = layer.router.weight.grad.clone()
        if rg == "default_moe":
            # kept experts 0 and 2 saw mean output 0: D = decay * D0; expert 1 kept its D0
            want_d = [[decay * v for v in d0[0]], d0[1], [decay * v for v in d0[2]]]
            torch.testing.assert_close(layer.router_grad.default_output, torch.tensor(want_d))
    assert torch.count_nonzero(grads["topk"]) == 0
    d = [[decay * v for v in d0[0]], d0[1], [decay * v for v in d0[2]]]
    kept = {(0, 0), (1, 2)}
    want = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # dL/dW[j, t]: x is the identity
    for t in range(2):
        z = sum(math.exp(v) for v in logits[t])
        s = [math.exp(v) / z for v in logits[t]]
        c = [0.0 if (t, i) in kept else sum(a * b for a, b in zip(g[t], d[i])) for i in range(3)]
        mean_c = sum(si * ci for si, ci in zip(s, c))
        for j in range(3):
            want[j][t] = s[j] * (c[j] - mean_c)  # softmax Jacobian
    torch.testing.assert_close(grads["default_moe"], torch.tensor(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_forward_unchanged_and_only_the_router_gradient_changes(name: str) -> None:
    """Same weights and input: default_moe's output is bit-identical to topk's, the experts'
    gradients too; the router's differs (the dense part) and stays finite."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    outs, grads = {}, {}
    for rg in ("topk", "default_moe"):
        torch.manual_seed(1)
        layer = variants.build(name, router_grad=rg, **small_fields(name)).train()
        torch.manual_seed(2)  # the same noise draws (noisy_topk, gshard) on both
        out = layer(x)
        (out.y.square().sum() + out.aux_loss).backward()
        outs[rg] = out.y.detach()
        grads[rg] = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert torch.equal(outs["topk"], outs["default_moe"])
    for n, grad in grads["topk"].items():
        if not n.startswith("router."):
            assert torch.equal(grad, grads["default_moe"][n]), n
    router_t, router_d = grads["topk"]["router.weight"], grads["default_moe"]["router.weight"]
    assert torch.isfinite(router_d).all() and not torch.equal(router_t, router_d)


def test_ema_updates_in_training_only_with_the_kept_tokens_mean() -> None:
    torch.manual_seed(0)
    layer = variants.build("mixtral", router_grad="default_moe", default_moe_decay=0.8, **SMALL)
    default = layer.router_grad.default_output
    layer.eval()(torch.randn(10, 8))
    with torch.no_grad():
        layer.train()(torch.randn(10, 8))
    assert torch.count_nonzero(default) == 0  # eval, and a no-grad pass: no update
    want = torch.zeros_like(default)
    layer.train()
    for _ in range(2):
        x = torch.randn(10, 8)
        out = layer(x)
        with torch.no_grad():
            for e in range(SMALL["num_experts"]):
                tokens = out.routing.token[out.routing.expert == e]
                if tokens.numel():
                    mean = layer.experts.expert_ffn(e, x[tokens]).mean(0)
                    want[e] = 0.8 * want[e] + 0.2 * mean
    torch.testing.assert_close(default, want)
    assert "router_grad.default_output" in layer.state_dict()  # saved with the model


@pytest.mark.parametrize(
    ("name", "fields", "backends"),
    [
        ("mixtral", {}, ("grouped",)),
        ("switch", {"top_k": 1, "capacity_factor": 1.0}, ("grouped", "padded")),
        (
            "deepseek_moe",
            {"num_shared_experts": 1, "top_k": 2, "capacity_factor": 1.5},
            ("grouped", "padded"),
        ),
    ],
)
def test_backends_match_loop_with_default_moe(name: str, fields: dict, backends: tuple) -> None:
    """Outputs, every gradient and the EMA after a training forward: each backend as loop."""
    x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(0))

    def run(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(1)
        layer = variants.build(
            name, router_grad="default_moe", backend=backend, **{**SMALL, **fields}
        ).train()
        out = layer(x)
        (out.y.square().sum() + out.aux_loss).backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        return out.y.detach(), grads, layer.router_grad.default_output.clone()

    y_ref, grads_ref, ema_ref = run("loop")
    for backend in backends:
        y, grads, ema = run(backend)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ema, ema_ref, rtol=1e-5, atol=1e-6)
        for n, g in grads_ref.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=f"{backend} {n}")


def test_expert_parallel_refuses_default_moe_in_one_line() -> None:
    from variants.parallel.expert_parallel import ExpertParallel

    layer = variants.build("mixtral", router_grad="default_moe", **SMALL)
    with pytest.raises(ValueError, match=r"^router_grad='default_moe' cannot run expert-parallel"):
        ExpertParallel(layer)


def test_estimator_registry_covers_every_allowed_name() -> None:
    from variants.contract.config import ROUTER_GRADS
    from variants.contract.router_grad import ESTIMATORS

    assert tuple(ESTIMATORS) == ROUTER_GRADS
    assert isinstance(
        variants.build("switch", router_grad="default_moe", top_k=1, **SMALL).router_grad,
        DefaultMoE,
    )


# default run: top-1, top-2 softmax and sigmoid grouped routers; the rest in the slow run
@pytest.mark.parametrize(
    "name", some_slow(TOKEN_CHOICE, set(TOKEN_CHOICE) - {"switch", "mixtral", "deepseek_v3"})
)
def test_default_moe_trains_every_token_choice_variant(name: str) -> None:
    """30 Adam steps fitting a fixed random map: the loss falls, the defaults stay finite."""
    torch.manual_seed(0)
    layer = variants.build(name, router_grad="default_moe", **small_fields(name)).train()
    losses = fit_losses(layer)
    assert losses[-1] < 0.9 * losses[0]
    assert torch.isfinite(layer.router_grad.default_output).all()


def test_default_moe_under_activation_checkpointing_updates_its_ema_once() -> None:
    """The recomputed forward of a checkpointed layer must not update the EMA stand-in a second
    time: the buffer, the output and every gradient equal the plain run's."""
    from variants.contract.recompute import checkpointed

    def run(checkpoint: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        layer = variants.build(
            "mixtral", d_model=16, num_experts=8, expert_hidden=16, top_k=2,
            router_grad="default_moe", backend="loop",
        ).train()  # fmt: skip
        before = {n: b.clone() for n, b in layer.named_buffers()}
        x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))
        out = checkpointed(layer, x) if checkpoint else layer(x)
        (out.y.square().sum() + out.aux_loss).backward()
        buffers = {n: b.clone() for n, b in layer.named_buffers()}
        assert any(not torch.equal(before[n], buffers[n]) for n in buffers)  # it did update
        return buffers, out.y.detach(), layer.router.weight.grad.clone()

    (plain, y, grad), (ckpt, y_ckpt, grad_ckpt) = run(False), run(True)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0)
    torch.testing.assert_close(y_ckpt, y, rtol=0, atol=0)
    torch.testing.assert_close(grad_ckpt, grad, rtol=1e-6, atol=1e-7)
