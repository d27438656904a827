"""The released models' rules on hand-checkable inputs: Llama 4's input-weighted sigmoid top-K,
gpt-oss's biased router and clamped SwiGLU experts, SparseMixer's selection and its gradient
estimator (Phi-3.5-MoE), and the expert options on every backend."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch

import variants
from variants.compute.backends import BACKENDS, grouped
from variants.compute.experts import ExpertBank, clamped_swiglu
from variants.contract.sparsemixer import SparseMixerGrad, sparsemixer

from .helpers import hand_routing, with_logits

HAND_LOGITS = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 2.5, 1.0], [1.0, 1.5, -2.0, 0.2]]


def test_llama4_sigmoid_of_the_kept_logits_scales_the_expert_input() -> None:
    layer, x = with_logits("llama4", torch.tensor(HAND_LOGITS), top_k=2, num_shared_experts=1)
    layer.eval()
    out = layer(x)
    routing = out.routing
    with torch.no_grad():
        for t, row in enumerate(HAND_LOGITS):
            a, b = sorted(range(4), key=lambda e: -row[e])[:2]
            mask = routing.token == t
            got = dict(
                zip(routing.expert[mask].tolist(), routing.weight[mask].tolist(), strict=True)
            )
            assert got == pytest.approx({e: 1 / (1 + math.exp(-row[e])) for e in (a, b)})
            x_t = x[t : t + 1]
            want = layer.shared.sum_all(x_t)
            for e in (a, b):
                want = want + layer.experts.expert_ffn(e, got[e] * x_t)
            torch.testing.assert_close(out.y[t : t + 1], want)
            # not the output-weighted form: the FFN is not linear in its input
            output_weighted = layer.shared.sum_all(x_t) + sum(
                got[e] * layer.experts.expert_ffn(e, x_t) for e in (a, b)
            )
            assert not torch.allclose(out.y[t : t + 1], output_weighted, atol=1e-4)
    torch.testing.assert_close(routing.scores, torch.sigmoid(torch.tensor(HAND_LOGITS)))


def test_gpt_oss_router_bias_selects_and_softmax_is_over_the_kept_logits() -> None:
    layer, x = with_logits("gpt_oss", torch.tensor(HAND_LOGITS), top_k=2)
    bias = [0.0, 0.0, 0.0, 2.5]  # lifts expert 3 into every token's top-2
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor(bias))
    routing = layer.eval()(x).routing
    for t, row in enumerate(HAND_LOGITS):
        biased = [u + b for u, b in zip(row, bias, strict=True)]
        a, b = sorted(range(4), key=lambda e: -biased[e])[:2]
        mask = routing.token == t
        got = dict(zip(routing.expert[mask].tolist(), routing.weight[mask].tolist(), strict=True))
        z = math.exp(biased[a]) + math.exp(biased[b])
        assert got == pytest.approx({a: math.exp(biased[a]) / z, b: math.exp(biased[b]) / z})
    assert 3 in routing.expert.tolist()
    assert routing.logits[0].tolist() == pytest.approx([2.0, 1.0, 0.0, 1.5])


def test_clamped_swiglu_by_hand() -> None:
    h1 = torch.tensor([8.0, -1.0, 0.5])  # gate: clamped above at 7 only
    h3 = torch.tensor([9.0, -8.0, 0.2])  # up: clamped to [-7, 7]
    want = []
    for g, u in zip([7.0, -1.0, 0.5], [7.0, -7.0, 0.2], strict=True):
        want.append(g / (1 + math.exp(-1.702 * g)) * (u + 1))
    assert clamped_swiglu(h1, h3).tolist() == pytest.approx(want)


def test_expert_biases_enter_each_projection() -> None:
    bank = ExpertBank(2, 3, 4, "clamped_swiglu", bias=True)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_()
    x = torch.randn(5, 3)
    want = (
        clamped_swiglu(x @ bank.w1[1] + bank.b1[1], x @ bank.w3[1] + bank.b3[1]) @ bank.w2[1]
        + bank.b2[1]
    )
    torch.testing.assert_close(bank.expert_ffn(1, x), want)
    both = bank.expert_ffn(0, x) + bank.expert_ffn(1, x)
    torch.testing.assert_close(bank.sum_all(x), both, rtol=1e-5, atol=1e-5)
    shard = bank.slice_experts(1, 2)
    torch.testing.assert_close(shard.expert_ffn(0, x), want)


IMPLEMENTATIONS = {
    **BACKENDS,
    "grouped_mm": partial(grouped, use_grouped_mm=True),
    "grouped_per_expert": partial(grouped, path="per_expert"),
}


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("backend", ["grouped", "grouped_mm", "grouped_per_expert", "padded"])
def test_biased_experts_match_loop_on_every_backend(backend: str, activation: str) -> None:
    T, E = 10, 4
    g = torch.Generator().manual_seed(0)
    bank = ExpertBank(E, 8, 4, activation, bias=True)  # 16-byte rows: grouped_mm's need
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3)  # gates past the clamp too
    token = torch.arange(T).repeat_interleave(2).tolist()
    expert = [e for t in range(T) for e in ((t % E), (t + 1) % E) if t != 3] + [2, 2]
    spec = dict(token=token, expert=expert, weight=torch.rand(2 * T, generator=g).tolist())
    x = torch.randn(T, 8, generator=g)
    outs = []
    for name in ("loop", backend):
        b, xi = copy.deepcopy(bank), x.clone().requires_grad_()
        routing = hand_routing(**spec, num_tokens=T, num_experts=E)
        routing.capacity = int(routing.load.max())
        y = IMPLEMENTATIONS[name](xi, routing, b).y_TD
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        outs.append((y, xi.grad, routing.weight.grad, {n: p.grad for n, p in b.named_parameters()}))
    (y0, gx0, gw0, gp0), (y1, gx1, gw1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-5)
    for n in gp0:
        torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-5, atol=1e-5, msg=n)


def test_megablocks_and_padded_bmm_refuse_biased_experts() -> None:
    with pytest.raises(ValueError, match="backend='megablocks' cannot compute experts with biases"):
        variants.build("gpt_oss", d_model=8, expert_hidden=8, backend="megablocks")
    bank = ExpertBank(2, 3, 4, "swiglu", bias=True)
    routing = hand_routing([0, 1], [0, 1], [1.0, 1.0], num_tokens=2, num_experts=2)
    with pytest.raises(ValueError, match="path='padded_bmm' computes gelu or swiglu experts"):
        grouped(torch.randn(2, 3), routing, bank, path="padded_bmm")


def test_sparsemixer_eval_by_hand() -> None:
    scores = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    # eps 0.01: expert 1 is 0.1/3 = 0.033 > 0.02 below the best, so masked: weight 1 alone;
    # the second pass (expert 0 out) likewise leaves expert 1 alone
    w, e = sparsemixer(scores, 0.01, training=False)
    assert e.tolist() == [[0, 1]] and w.flatten().tolist() == pytest.approx([1.0, 1.0])
    # eps 0.3: expert 1 is inside the band (0.033 < 0.6): the first weight is a softmax of two
    w, e = sparsemixer(scores, 0.3, training=False)
    assert e.tolist() == [[0, 1]]
    first = math.exp(3.0) / (math.exp(3.0) + math.exp(2.9))
    assert w.flatten().tolist() == pytest.approx([first, 1.0])


def test_sparsemixer_gradient_estimator_by_hand() -> None:
    """HF's `PhimoeMultiplier`: forward weight * midpoint, backward to the scores
    grad * weight * (onehot(choice) - probs), the midpoint factor not differentiated."""
    scores = torch.tensor([[1.0, 0.5, -0.5]], requires_grad=True)
    probs = torch.softmax(scores.detach(), -1)
    choice = torch.tensor([[1]])
    weight = probs.gather(-1, choice)
    out = SparseMixerGrad.apply(scores, weight, choice, probs, torch.tensor([[0.3333]]))
    assert out.item() == pytest.approx(0.3333 * weight.item())
    out.backward(torch.tensor([[2.0]]))
    onehot = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(scores.grad, 2.0 * weight * (onehot - probs))


def test_phimoe_training_gradient_is_not_plain_top2() -> None:
    """Same choices and weights, other gradient: where the midpoint is 1/3 the estimator's
    router gradient is 3x what autograd through the forward value would give."""
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    scores = logits.clone().requires_grad_()
    w, e = sparsemixer(scores, 0.5, training=True)
    w.sum().backward()
    torch.manual_seed(0)
    plain = logits.clone().requires_grad_()
    w_again, e_again = sparsemixer(plain, 0.5, training=True)
    assert torch.equal(e, e_again) and torch.equal(w, w_again)
    # autograd through the same forward value: the band's softmax times the (constant)
    # midpoint factor, recomputed with plain torch ops
    assert (w < 0.99 * torch.stack([torch.ones(32), torch.ones(32)], -1)).any()
    gates = []
    for k in range(2):
        masked = plain if k == 0 else plain.scatter(-1, e[:, :1], float("-inf"))
        best = masked.max(-1, keepdim=True).values.detach()
        factor = plain.detach().abs().clamp(min=best)
        far = ((best - plain.detach()) / factor) > 1.0
        probs = torch.softmax(masked.masked_fill(far, float("-inf")), -1)
        p_k = probs.gather(-1, e[:, k : k + 1])
        gates.append(p_k * (w[:, k : k + 1] / p_k).detach())
    torch.testing.assert_close(torch.cat(gates, -1), w)
    torch.cat(gates, -1).sum().backward()
    assert not torch.allclose(scores.grad, plain.grad, atol=1e-4)
