"""Equal-active-FLOPs configs, parameter counts and analytic FLOPs per token.

A comparison is fair when every variant spends the same expert FLOPs per token. The reference
is a dense FFN of width `d_ff`; a model size names `expansion` N (routed expert parameters = N
such FFNs) and `active` K (expert FLOPs per token = K such FFNs). Fine-grained segmentation
(DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066, Sec. 3.1-3.2) with granularity m and Ks shared
experts then gives

    expert_hidden = d_ff / m,   num_experts = m N - Ks,   top_k = m K - Ks,

so `(top_k + Ks) * expert_hidden = K * d_ff` for every m and Ks. A variant whose paper fixes
top_k (Switch: 1, GShard and Mixtral: 2) gives top_k instead, and m = (top_k + Ks) / K follows:
at K=2, Switch's one expert is 2 d_ff wide. Dense gets one FFN of width K d_ff.

FLOPs count multiply-adds as 2 and leave out activations, softmax and dispatch (they are
O(width), not O(width^2)); the backward pass is counted as twice the forward.
"""

from __future__ import annotations

import math
from fractions import Fraction

from torch import nn

from variants import MoEConfig
from variants.compute.experts import GATED

BACKWARD_FACTOR = 2  # grad wrt inputs + grad wrt weights, each one forward's matmuls


def iso_fields(
    variant: type[MoEConfig],
    d_model: int,
    d_ff: int,
    expansion: int,
    active: int,
    granularity: float | None = None,
    shared: int = 0,
    top_k: int | None = None,
) -> dict[str, int]:
    """Size fields of the `variant` config class with the active expert FLOPs per token of
    `active` dense FFNs."""
    if variant.kind == "dense":  # one FFN: recorded as one expert of that width, always chosen
        width = active * d_ff
        return {
            "d_model": d_model,
            "d_ff": width,
            "expert_hidden": width,
            "num_experts": 1,
            "top_k": 1,
        }
    if granularity is not None:
        if not math.isfinite(granularity) or granularity <= 0:
            raise ValueError(
                f"granularity={granularity} must be a finite number > 0 "
                "(expert_hidden = d_ff / granularity)"
            )
        m = Fraction(granularity).limit_denominator(1024)
        origin = f"granularity={granularity}"
    elif top_k is not None:
        m = Fraction(top_k + shared, active)
        origin = f"top_k={top_k} with num_shared_experts={shared} at active={active}"
    else:
        raise ValueError(
            "variant.granularity or variant.top_k must be set to derive the variant's sizes "
            "from the model group"
        )
    sizes = {
        "expert_hidden": (Fraction(d_ff) / m, f"d_ff / m = {d_ff} / ({m})"),
        "num_experts": (m * expansion - shared, f"m * N - Ks = ({m}) * {expansion} - {shared}"),
        "top_k": (m * active - shared, f"m * K - Ks = ({m}) * {active} - {shared}"),
    }
    fields = {"d_model": d_model, "num_shared_experts": shared}
    for name, (value, formula) in sizes.items():
        if value.denominator != 1 or value < 1:
            raise ValueError(
                f"{origin} gives granularity m={m} and {name} = {formula} = {float(value):g}, "
                f"which must be a whole number >= 1; choose a granularity (or top_k) that splits "
                f"d_ff={d_ff} into whole experts, or set num_experts, expert_hidden and top_k "
                "to size the layer yourself"
            )
        fields[name] = int(value)
    return fields


def count_params(module: nn.Module) -> tuple[int, int]:
    """(total, active per token): routed experts count top_k/E of their parameters."""
    total = sum(p.numel() for p in module.parameters())
    cfg: MoEConfig = module.cfg
    if cfg.kind == "dense":  # every parameter works on every token
        return total, total
    routed = sum(p.numel() for p in module.experts.parameters())
    active = total - routed + routed * cfg.top_k / cfg.num_experts
    return total, round(active)


def ffn_flops_per_token(cfg: MoEConfig) -> int:
    """Forward FLOPs per token of one layer: router plus every expert FFN the token uses."""
    mats = 3 if cfg.activation in GATED else 2  # w1, w2 (and w3: swiglu, clamped_swiglu)
    router = 0 if cfg.kind == "dense" else 2 * cfg.d_model * cfg.num_experts
    experts = 2 * mats * cfg.d_model * cfg.active_width()
    return round(router + experts)


def dense_reference(cfg: MoEConfig) -> dict[str, int | str]:
    """Fields of the dense FFN with the same active expert FLOPs as `cfg` (ratio_to_dense)."""
    return {"d_model": cfg.d_model, "d_ff": round(cfg.active_width()), "activation": cfg.activation}
