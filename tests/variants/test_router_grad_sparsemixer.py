"""router_grad=sparsemixer: SparseMixer's top-2 selection and gradient estimator (GRIN, Liu et
al. 2024, arXiv:2409.12136) on the token-choice top-2 variants, checked by hand in eval, against
HF transformers' `sparsemixer` in training, against phimoe on the same weights, and across
backends; refused in one line where it does not apply.

Shape legend: T tokens, E experts, K = 2 choices.
"""

from __future__ import annotations

import math

import pytest
import torch

import variants
from moe_bench import invariance
from tests.variants.helpers import fit_losses, with_logits
from variants.compute.backends import BACKENDS
from variants.contract.router_grad import SparseMixer

SMALL = {"d_model": 8, "num_experts": 4, "expert_hidden": 6}
# the variants whose router selects through `Router.select`, at top_k=2
SELECTING = {
    "mixtral": {},
    "gshard": {"capacity_factor": 1.0},
    "deepseek_moe": {"top_k": 2, "num_shared_experts": 1, "capacity_factor": 1.5},
}


def softmax(values: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in values)
    return [math.exp(v) / z for v in values]


def test_eval_forward_by_hand() -> None:
    """E=4, jitter_eps=0.1: an expert stays in a choice's band when (best - s) / max(|s|, best)
    <= 0.2. Token 0, logits (2, 1.8, 1.55, -1): band {0, 1} (gaps 0.1; 0.225 and 1.5 out),
    first choice 0 with weight softmax over (2, 1.8); then best 1.8, band {1, 2} (gap 0.139),
    weight softmax over (1.8, 1.55). Token 1, logits (0, 1, 0.95, 0.9): band {1, 2, 3} (gaps
    0.05, 0.1; expert 0: gap 1), choice 1; then best 0.95, band {2, 3} (gap 0.053), choice 2.
    Token 2, logits (-1, -3, 1, -1.1): first band {2} alone (weight 1); then best -1, whose
    band holds expert 3 (gap 0.1 / max(1.1, -1) = 0.09) and not 1 (gap 2 / 3 = 0.67)."""
    logits = [[2.0, 1.8, 1.55, -1.0], [0.0, 1.0, 0.95, 0.9], [-1.0, -3.0, 1.0, -1.1]]
    layer, x = with_logits(
        "mixtral", torch.tensor(logits), router_grad="sparsemixer", jitter_eps=0.1
    )
    assert isinstance(layer.router_grad, SparseMixer)
    out = layer.eval()(x)
    want_expert = [0, 1, 1, 2, 2, 0]
    want_weight = [
        softmax([2.0, 1.8])[0],
        softmax([1.8, 1.55])[0],
        softmax([1.0, 0.95, 0.9])[0],
        softmax([0.95, 0.9])[0],
        1.0,
        softmax([-1.0, -1.1])[0],
    ]
    assert out.routing.token.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.routing.expert.tolist() == want_expert
    torch.testing.assert_close(out.routing.weight, torch.tensor(want_weight), rtol=0, atol=1e-6)
    with torch.no_grad():
        want_y = torch.stack(
            [
                sum(
                    want_weight[2 * t + k] * layer.experts.expert_ffn(want_expert[2 * t + k], x[t])
                    for k in range(2)
                )
                for t in range(3)
            ]
        )
    torch.testing.assert_close(out.y, want_y, rtol=1e-5, atol=1e-6)
    # plain top-2 (mixtral's Eq. 1-2) weighs them otherwise
    plain, _ = with_logits("mixtral", torch.tensor(logits))
    plain.load_state_dict(layer.state_dict())
    assert not torch.allclose(plain.eval()(x).routing.weight, out.routing.weight)


def router_logit_grad(router_grad: str, logits: torch.Tensor, g: torch.Tensor, seed: int) -> tuple:
    """A training forward of mixtral with the router's logits pinned to `logits` (x is the
    identity): the routing, dL/dlogits for L = sum(g * y), and the layer."""
    torch.manual_seed(0)
    layer, x = with_logits(
        "mixtral", logits, router_grad=router_grad, jitter_eps=0.15, balance_coef=0.0
    )
    torch.manual_seed(seed)
    out = layer.train()(x)
    (out.y * g).sum().backward()
    return out.routing, layer.router.weight.grad.T.clone(), layer, x  # W = logits^T


def test_training_gradient_equals_hf_sparsemixer_and_differs_from_plain_top2() -> None:
    modeling = pytest.importorskip(
        "transformers.models.phimoe.modeling_phimoe",
        reason="HF transformers (the reference implementation) is not installed",
    )
    gen = torch.Generator().manual_seed(0)
    T, E = 6, 4
    logits = torch.randn(T, E, generator=gen) + 1.0  # first bands of 1 and 2 experts
    g = torch.randn(T, T, generator=gen)  # dL/dy; d_model = T (x is the identity)
    routing, grad_ours, layer, x = router_logit_grad("sparsemixer", logits, g, seed=5)

    # HF on the same logits and seed; L as a function of the weights: sum_tk w_tk c_tk with
    # c_tk = <g_t, FFN_{e_tk}(x_t)>, so dL/dw = c
    torch.manual_seed(5)
    u = logits.clone().requires_grad_()
    weight_hf, expert_hf = modeling.sparsemixer(u, jitter_eps=0.15, training=True)
    assert routing.expert.view(T, 2).tolist() == expert_hf.tolist()
    torch.testing.assert_close(routing.weight.view(T, 2), weight_hf.detach())
    with torch.no_grad():
        c = torch.tensor(
            [
                [
                    float(g[t] @ layer.experts.expert_ffn(int(expert_hf[t, k]), x[t]))
                    for k in range(2)
                ]
                for t in range(T)
            ]
        )
    (weight_hf * c).sum().backward()
    torch.testing.assert_close(grad_ours, u.grad, rtol=1e-5, atol=1e-6)
    assert grad_ours.abs().max() > 1e-3  # the bands hold several experts: a real gradient

    _, grad_plain, _, _ = router_logit_grad("topk", logits, g, seed=5)
    assert not torch.allclose(grad_plain, grad_ours, atol=1e-4)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mixtral_with_sparsemixer_routes_as_phimoe_on_the_same_weights(mode: str) -> None:
    """Where the configs coincide (E, K=2, SwiGLU experts, jitter_eps, balance_coef; both
    losses' f count the plain top-2, not the samples), same weights and seed give the same
    choices, weights, output, losses and every gradient."""
    fields = dict(SMALL, num_experts=4, activation="swiglu", jitter_eps=0.2, balance_coef=0.01)
    phimoe = variants.build("phimoe", **fields)
    mixtral = variants.build("mixtral", router_grad="sparsemixer", **fields)
    mixtral.load_state_dict(phimoe.state_dict())
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    got = []
    for layer in (phimoe, mixtral):
        layer.train(mode == "train")
        torch.manual_seed(7)
        out = layer(x)
        (out.y.square().sum() + out.aux_loss).backward()
        got.append((out, {n: p.grad for n, p in layer.named_parameters()}))
    (ref, grads_ref), (out, grads) = got
    assert torch.equal(out.routing.token, ref.routing.token)
    assert torch.equal(out.routing.expert, ref.routing.expert)
    assert torch.equal(out.routing.weight, ref.routing.weight)
    assert torch.equal(out.y, ref.y)
    assert out.losses.keys() == ref.losses.keys() == ({"balance"} if mode == "train" else set())
    for n, loss in ref.losses.items():
        torch.testing.assert_close(out.losses[n], loss, rtol=1e-6, atol=0, msg=n)
    assert grads.keys() == grads_ref.keys()
    for n, grad in grads_ref.items():
        torch.testing.assert_close(grads[n], grad, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("name", "fields"), SELECTING.items())
def test_every_backend_equals_loop(name: str, fields: dict, mode: str) -> None:
    """Same weights and seed (the same SparseMixer draws): outputs, routing and every gradient
    of each CPU backend the config allows equal `loop`'s."""
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0))
    ran = []
    for backend in BACKENDS:
        if backend == "megablocks":  # CUDA only
            continue
        try:
            variants.make_config(name, backend=backend, **{**SMALL, **fields})
        except ValueError:  # padded needs a capacity
            continue
        torch.manual_seed(1)
        layer = variants.build(
            name, router_grad="sparsemixer", backend=backend, **{**SMALL, **fields}
        ).train(mode == "train")
        torch.manual_seed(2)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (out.y.square().sum() + out.aux_loss).backward()
        ran.append((backend, out, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    assert ran[0][0] == "loop" and len(ran) >= 2, [r[0] for r in ran]
    _, ref, gx_ref, grads_ref = ran[0]
    for backend, out, gx, grads in ran[1:]:
        assert torch.equal(out.routing.expert, ref.routing.expert), backend
        torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        for n, g in grads_ref.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=f"{backend} {n}")


@pytest.mark.parametrize(("name", "fields"), SELECTING.items())
def test_training_lowers_the_loss(name: str, fields: dict) -> None:
    """30 Adam steps fitting a fixed random map with SparseMixer's sampled routing."""
    torch.manual_seed(0)
    fields = {**SMALL, **fields, "capacity_factor": None, "jitter_eps": 0.3}
    layer = variants.build(name, router_grad="sparsemixer", **fields).train()
    losses = fit_losses(layer)
    assert losses[-1] < 0.9 * losses[0]


def test_gshard_keeps_both_sampled_choices() -> None:
    """GShard's random routing of the second choice is off: SparseMixer samples it itself, so
    every token keeps two experts (dropless here) in training."""
    # wide bands (jitter_eps=1): second weights below 1/2, which random routing would drop
    layer = variants.build(
        "gshard", router_grad="sparsemixer", capacity_factor=None, jitter_eps=1.0, **SMALL
    )
    torch.manual_seed(0)
    routing = layer.train()(torch.randn(40, 8)).routing
    assert torch.equal(torch.bincount(routing.token, minlength=40), torch.full((40,), 2))


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("switch", {}, r"router_grad='sparsemixer' needs top_k=2 .*, not top_k=1; allowed here"),
        ("deepseek_moe", {}, r"router_grad='sparsemixer' needs top_k=2 .*, not top_k=7"),
        (
            "deepseek_v3",
            {"top_k": 2, "num_groups": 1},
            r"router_grad='sparsemixer' is not allowed here \(.*sigmoid.*\); allowed: 'topk'",
        ),
        ("sinkhorn", {"top_k": 2}, r"router_grad='sparsemixer' is not allowed here \(sinkhorn"),
        ("qwen3_next", {"top_k": 2}, r"norm_topk_prob=True does not apply with router_grad="),
    ],
)
def test_refused_in_one_line(name: str, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}") as err:
        variants.make_config(name, router_grad="sparsemixer", **fields)
    assert "\n" not in str(err.value)


def test_draws_over_the_batch_follows_router_grad() -> None:
    """The invariance suite states, rather than judges, a split's routing for a config that
    samples over the whole forward: SparseMixer's, by the field, not by the variant's name."""
    assert variants.make_config("mixtral", router_grad="sparsemixer").draws_over_the_batch
    assert not variants.make_config("mixtral").draws_over_the_batch
    assert not variants.make_config("gshard", router_grad="default_moe").draws_over_the_batch
    assert variants.make_config("phimoe").draws_over_the_batch


def test_invariance_suite_passes_a_sparsemixer_case() -> None:
    """Split into 4 micro-batches, the draws differ (routing stated), while a sequence-scoped
    loss, counting the plain top-2, stays equal as the suite expects."""
    fields = dict(invariance.small_fields("mixtral"), balance_scope="sequence")
    fields.update(router_grad="sparsemixer", jitter_eps=0.3)
    case = invariance.Case("mixtral", tuple(sorted(fields.items())), "mixtral · sparsemixer")
    rows = invariance.local_rows([case])
    assert invariance.failures(rows) == []
    by = {(r["split"], r["quantity"]): r for r in rows}
    assert by["micro4", "routing"]["expect"] == "stated" and by["micro4", "routing"]["max_diff"] > 0
    assert by["micro4", "aux_loss"]["expect"] == "equal"


def test_which_variants_take_it_and_each_routes_two_distinct_experts() -> None:
    """Every registered variant asked for router_grad=sparsemixer at top_k=2: the ones whose
    router selects by softmax logits through `Router.select` take it (the deepseek_moe family
    where norm_topk_prob is off by default); each of them trains a step with two distinct
    experts per token and a finite router gradient."""
    took = []
    for name in variants.names():
        fields = {**SMALL, "top_k": 2, "router_grad": "sparsemixer"}
        try:
            variants.make_config(name, **fields)
        except ValueError as err:
            assert "\n" not in str(err), name
            continue
        took.append(name)
        torch.manual_seed(0)
        layer = variants.build(name, **fields).train()
        out = layer(torch.randn(12, 8))
        (out.y.square().sum() + out.aux_loss).backward()
        pairs = torch.stack((out.routing.token, out.routing.expert)).unique(dim=1)
        assert pairs.shape[1] == out.routing.token.numel(), name  # distinct (gshard may drop)
        assert int(out.routing.demand.sum()) == 24, name  # two asked per token
        assert torch.isfinite(layer.router.weight.grad).all(), name
    assert took == ["deepseek_moe", "gpt_oss", "gshard", "mixtral", "olmoe", "qwen3_moe"]
