"""Tiny fakes for variants tests: hand-built routings and layers with known router weights."""

from __future__ import annotations

import torch

import variants
from variants.compute.assignments import Routing, make_routing


def hand_routing(
    token: list[int],
    expert: list[int],
    weight: list[float],
    num_tokens: int,
    num_experts: int,
    capacity: int | None = None,
) -> Routing:
    """A Routing record from plain lists (scores and logits are placeholders)."""
    expert_A = torch.tensor(expert, dtype=torch.long)
    return make_routing(
        token_A=torch.tensor(token, dtype=torch.long),
        expert_A=expert_A,
        weight_A=torch.tensor(weight, dtype=torch.float32).requires_grad_(),
        scores_TE=torch.full((num_tokens, num_experts), 1.0 / num_experts),
        logits_TE=torch.zeros(num_tokens, num_experts),
        demand_E=torch.bincount(expert_A, minlength=num_experts),
        capacity=capacity,
    )


def with_logits(
    name: str, logits_TE: torch.Tensor, **fields
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A layer whose router produces exactly `logits_TE` on the returned input x_TD.

    x is the identity basis padded to d_model = T (so x @ W^T = W^T rows), and the router
    weight is set to logits^T; this pins hand-checkable logits without touching internals.
    """
    T, E = logits_TE.shape
    layer = variants.build(name, d_model=T, num_experts=E, expert_hidden=8, **fields)
    with torch.no_grad():
        layer.router.weight.copy_(logits_TE.T)
    return layer, torch.eye(T)


def feed_token_ids(layer: torch.nn.Module) -> torch.nn.Module:
    """A layer that routes by token id (`cfg.uses_token_ids`) gets, on calls that give none,
    `token_ids` = each token's flat index mod vocab_size (x's shape without D), so the generic
    contract and backend tests call every variant as `layer(x)`. Other layers are unchanged."""
    if not layer.cfg.uses_token_ids:
        return layer

    def hook(module, args, kwargs):
        if kwargs.get("token_ids") is None:
            x = args[0]
            ids = torch.arange(x[..., 0].numel(), device=x.device) % module.cfg.vocab_size
            kwargs = {**kwargs, "token_ids": ids.view(x.shape[:-1])}
        return args, kwargs

    layer.register_forward_pre_hook(hook, with_kwargs=True)
    return layer


def fit_losses(layer: torch.nn.Module, steps: int = 30) -> list[float]:
    """Adam steps of `layer` (width 8) fitting a fixed random map, its aux loss added: the fit
    loss at each step, the router's gradient checked finite and the bias updated each step."""
    x, target = torch.randn(32, 8), torch.randn(32, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = layer(x)
        loss = (out.y - target).square().mean()
        (loss + out.aux_loss).backward()
        assert torch.isfinite(layer.router.weight.grad).all()
        opt.step()
        layer.update_bias()
        losses.append(float(loss.detach()))
    return losses
