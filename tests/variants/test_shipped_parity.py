"""Peer parity: each released model's variant against its own HF transformers block.

For every model, with HF's block built from its config class at tiny sizes and the weights
copied both ways (HF's drawn and copied into ours; ours drawn and copied into HF's), the two
give the same expert choices, the same `y` within 1e-5 (fp32) and the same gradients (input
and every parameter), in eval and in training (every rule here is deterministic in training
except SparseMixer's sampling, checked under one seed: same draws, same choices, same
gradient estimator). HF's eager expert loop (`experts_implementation="eager"`) is the
reference: the code the docstrings of the variants quote.

Checked against transformers 5.25 (the version in the dev extra when written; the version that
ran is in each test's id). Skipped, with the reason, where transformers is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import variants
from tests.slow_cases import some_slow

if importlib.util.find_spec("transformers") is None:
    pytest.skip(
        "transformers is not installed (optional, in the dev extra): no HF block to compare",
        allow_module_level=True,
    )

# the installed version without importing the package: its import takes a second, paid by
# every xdist worker at collection, and only the worker that runs these tests needs it
HF_VERSION = importlib.metadata.version("transformers")
D, H, E = 16, 8, 8
View = Callable[[torch.nn.Module], torch.Tensor]  # HF block -> a view in our layout


def _linear_t(path: str) -> View:
    """An nn.Linear's weight [out, in] as our [in, out] (one shared expert: [1, in, out])."""
    return lambda hf: hf.get_submodule(path).weight.T[None]


def _gate_up_rows(half: int) -> View:
    """Qwen/OLMoE/Phi `gate_up_proj` [E, 2H, D]: gate rows first, then up; ours [E, D, H]."""
    return lambda hf: hf.experts.gate_up_proj[:, half * H : (half + 1) * H].transpose(1, 2)


def _down_t(hf: torch.nn.Module) -> torch.Tensor:
    return hf.experts.down_proj.transpose(1, 2)  # [E, D, H] -> [E, H, D]


SOFTMAX_TOPK_VIEWS: dict[str, View] = {
    "router.weight": lambda hf: hf.gate.weight,
    "experts.w1": _gate_up_rows(0),
    "experts.w3": _gate_up_rows(1),
    "experts.w2": _down_t,
}


@dataclass
class Model:
    """How one HF block is built, called and mapped onto our layer's parameters."""

    variant: str
    fields: dict
    hf_block: Callable[[], torch.nn.Module]
    views: dict[str, View]  # our parameter name -> its HF tensor, viewed in our layout
    hf_choice: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # [T, K] experts


def _hf(module: str, config: str, block: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        conf_cls = getattr(importlib.import_module(f"transformers.models.{module}"), config)
        conf = conf_cls(hidden_size=D, hidden_act="silu", **kwargs)
        conf.experts_implementation = "eager"
        return getattr(mod, block)(conf)

    return make


def _gate_choice(hf: torch.nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    return hf.gate(x_TD)[2]


def _llama4_choice(hf: torch.nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    return hf.router(x_TD)[1].topk(hf.top_k, dim=-1).indices  # top-K of the logits


MODELS = {
    "qwen3_moe": Model(
        "qwen3_moe",
        dict(num_experts=E, top_k=3, norm_topk_prob=True),
        _hf(
            "qwen3_moe",
            "Qwen3MoeConfig",
            "Qwen3MoeSparseMoeBlock",
            num_experts=E,
            num_experts_per_tok=3,
            moe_intermediate_size=H,
            norm_topk_prob=True,
        ),
        SOFTMAX_TOPK_VIEWS,
        _gate_choice,
    ),
    "olmoe": Model(
        "olmoe",
        dict(num_experts=E, top_k=3),
        _hf(
            "olmoe",
            "OlmoeConfig",
            "OlmoeSparseMoeBlock",
            num_experts=E,
            num_experts_per_tok=3,
            intermediate_size=H,
        ),
        SOFTMAX_TOPK_VIEWS,
        _gate_choice,
    ),
    "qwen3_next": Model(
        "qwen3_next",
        dict(num_experts=E, top_k=3, shared_hidden=12),
        _hf(
            "qwen3_next",
            "Qwen3NextConfig",
            "Qwen3NextSparseMoeBlock",
            num_experts=E,
            num_experts_per_tok=3,
            moe_intermediate_size=H,
            shared_expert_intermediate_size=12,
        ),
        {
            **SOFTMAX_TOPK_VIEWS,
            "shared.w1": _linear_t("shared_expert.gate_proj"),
            "shared.w3": _linear_t("shared_expert.up_proj"),
            "shared.w2": _linear_t("shared_expert.down_proj"),
            "shared_gate.weight": lambda hf: hf.shared_expert_gate.weight,
        },
        _gate_choice,
    ),
    "phimoe": Model(
        "phimoe",
        dict(num_experts=E, jitter_eps=0.3),
        _hf(
            "phimoe",
            "PhimoeConfig",
            "PhimoeSparseMoeBlock",
            num_local_experts=E,
            intermediate_size=H,
            router_jitter_noise=0.3,  # a wide band: second candidates inside it are common
        ),
        {
            "router.weight": lambda hf: hf.router.weight,
            "experts.w1": _gate_up_rows(0),
            "experts.w3": _gate_up_rows(1),
            "experts.w2": _down_t,
        },
        lambda hf, x_TD: hf.router(x_TD)[2],
    ),
    "gpt_oss": Model(
        "gpt_oss",
        dict(num_experts=E, top_k=3),
        _hf(
            "gpt_oss",
            "GptOssConfig",
            "GptOssMLP",
            num_local_experts=E,
            num_experts_per_tok=3,
            intermediate_size=H,
        ),
        {
            "router.weight": lambda hf: hf.router.weight,
            "router.bias": lambda hf: hf.router.bias,
            # gate and up interleaved in the last dim (gate even columns, up odd)
            "experts.w1": lambda hf: hf.experts.gate_up_proj[..., ::2],
            "experts.w3": lambda hf: hf.experts.gate_up_proj[..., 1::2],
            "experts.b1": lambda hf: hf.experts.gate_up_proj_bias[..., ::2],
            "experts.b3": lambda hf: hf.experts.gate_up_proj_bias[..., 1::2],
            "experts.w2": lambda hf: hf.experts.down_proj,
            "experts.b2": lambda hf: hf.experts.down_proj_bias,
        },
        lambda hf, x_TD: hf.router(x_TD)[2],
    ),
    "llama4": Model(
        "llama4",
        dict(num_experts=E, top_k=2),
        _hf(
            "llama4",
            "Llama4TextConfig",
            "Llama4TextMoe",
            num_local_experts=E,
            num_experts_per_tok=2,
            intermediate_size=H,
        ),
        {
            "router.weight": lambda hf: hf.router.weight,
            "experts.w1": lambda hf: hf.experts.gate_up_proj[..., :H],
            "experts.w3": lambda hf: hf.experts.gate_up_proj[..., H:],
            "experts.w2": lambda hf: hf.experts.down_proj,
            "shared.w1": _linear_t("shared_expert.gate_proj"),
            "shared.w3": _linear_t("shared_expert.up_proj"),
            "shared.w2": _linear_t("shared_expert.down_proj"),
        },
        _llama4_choice,
    ),
}


def _pair(model: Model, direction: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, HF's) with equal weights: drawn on one side, copied into the other."""
    torch.manual_seed(0)
    ours = variants.build(model.variant, d_model=D, expert_hidden=H, **model.fields)
    hf = model.hf_block()
    names = dict(ours.named_parameters())
    assert set(names) == set(model.views), "every parameter of ours has its HF counterpart"
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in names.values())
    with torch.no_grad():
        for name, view in model.views.items():
            src, dst = (
                (view(hf), names[name]) if direction == "hf_to_ours" else (names[name], view(hf))
            )
            if direction == "hf_to_ours":
                src.normal_(std=0.5)  # HF allocates uninitialised or zero weights
            elif name.endswith(("b1", "b2", "b3", "router.bias")):
                src.normal_(std=0.5)  # our biases start at zero: draw them too
            dst.copy_(src)
    return ours, hf


def _hf_y(hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = hf(x)
    return out[0].view(x.shape) if isinstance(out, tuple) else out


def _grads(model: Model, ours, hf, x, mode: str, seed: int):
    """(y, expert choices [T, K] sorted, x grad, {our name: grad}) of each side."""
    results = []
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for side in ("ours", "hf"):
        layer = ours if side == "ours" else hf
        layer.train(mode == "train")
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)  # SparseMixer's draws: the same stream on both sides
        if side == "ours":
            out = ours(xi)
            y, r = out.y, out.routing
            choice = r.expert.view(-1, r.token.numel() // r.num_tokens)
        else:
            y = _hf_y(hf, xi)
            torch.manual_seed(seed)
            choice = model.hf_choice(hf, x.detach().view(-1, D))
        (y * g).sum().backward()
        if side == "ours":
            grads = {n: p.grad for n, p in ours.named_parameters()}
        else:
            grads = {n: _view_grad(view, hf) for n, view in model.views.items()}
        results.append((y.detach(), choice.sort(-1).values, xi.grad, grads))
    return results


def _view_grad(view: View, hf: torch.nn.Module) -> torch.Tensor:
    """The HF gradient of a view's parameter, in our layout (the same view of `.grad`)."""
    shadow = {n: p.grad for n, p in hf.named_parameters()}
    swapped = {}
    with torch.no_grad():
        for n, p in hf.named_parameters():
            swapped[n] = p.data
            p.data = shadow[n] if shadow[n] is not None else torch.zeros_like(p)
        try:
            return view(hf).clone()
        finally:
            for n, p in hf.named_parameters():
                p.data = swapped[n]


# every model in eval and train with HF's weights copied into ours in the default run; with ours
# copied into HF's (the same views, the other way) in the slow run
@pytest.mark.parametrize("direction", some_slow(["hf_to_ours", "ours_to_hf"], ["ours_to_hf"]))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(
    "name", list(MODELS), ids=[f"{n}@transformers-{HF_VERSION}" for n in MODELS]
)
def test_same_choices_output_and_gradients_as_hf(name: str, mode: str, direction: str) -> None:
    model = MODELS[name]
    ours, hf = _pair(model, direction)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(2))
    (y, choice, gx, grads), (y_hf, choice_hf, gx_hf, grads_hf) = _grads(
        model, ours, hf, x, mode, seed=3
    )
    msg = f"{name} vs transformers {HF_VERSION} ({mode}, {direction})"
    assert torch.equal(choice, choice_hf), msg
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5, msg=msg)
    torch.testing.assert_close(gx, gx_hf, rtol=1e-5, atol=1e-5, msg=msg)
    for n in model.views:
        torch.testing.assert_close(grads[n], grads_hf[n], rtol=1e-5, atol=1e-5, msg=f"{msg}: {n}")
