"""Config base for every variant, and the validation helpers its errors come from.

Every error is a `ValueError` whose message names the field, the value and the rule,
for example ``top_k=9 must be <= num_experts=8``: users meet these from the command line,
so they must read like a sentence, not like a stack trace.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..compute.assignments import experts_per_token_stats
from ..compute.backends import get_backend

ACTIVATIONS = ("gelu", "swiglu", "clamped_swiglu")
BALANCE_SCOPES = ("micro_batch", "sequence", "global_batch")
# how the router's gradient is estimated (`variants.contract.router_grad` holds one estimator
# per name): "topk", the plain top-K gradient; "default_moe", Panda et al. 2025's EMA stand-in;
# "sparsemixer", GRIN's SparseMixer (Liu et al. 2024): its own top-2 selection and estimator
ROUTER_GRADS = ("topk", "default_moe", "sparsemixer")
ROUTER_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def check_int(obj: Any, name: str, minimum: int | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def check_number(obj: Any, name: str, minimum: float | None = None, positive: bool = False) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if positive and value <= 0:
        raise ValueError(f"{name}={value} must be > 0")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def check_choice(obj: Any, name: str, allowed: tuple[str, ...] | list[str]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def check_le(obj: Any, small: str, big: str) -> None:
    a, b = getattr(obj, small), getattr(obj, big)
    if a > b:
        raise ValueError(f"{small}={a} must be <= {big}={b}")


def check_divides(obj: Any, divisor: str, dividend: str) -> None:
    a, b = getattr(obj, divisor), getattr(obj, dividend)
    if b % a:
        raise ValueError(f"{dividend}={b} must be divisible by {divisor}={a}")


@dataclass
class MoEConfig:
    """Fields every variant accepts (docs/contract.md §2). Variants subclass it with paper defaults.

    Sizes default small (a CPU-friendly layer); routing hyperparameters default to each paper.
    `leaks_future_tokens` marks routings where a token's experts depend on later tokens of the
    batch (expert choice): unfit for causal language models, flagged in reports. It is a
    property of the instance, since a field can decide it (expert choice's selection_scope).
    """

    # what the layer is: "routed" (a router picks experts) or "dense" (one FFN, the baseline);
    # the runner and reports ask this, never a name
    kind: ClassVar[str] = "routed"
    # megablocks' dropless kernels need every token to keep exactly top_k experts; a variant
    # whose routing cannot promise that says why here.
    uneven_top_k: ClassVar[str | None] = None
    # why a variant must stay dropless (capacity_factor None), where it must
    dropless: ClassVar[str | None] = None
    # (K, why) where the paper fixes top_k (Switch: top-1, GShard: top-2)
    fixed_top_k: ClassVar[tuple[int, str] | None] = None
    # experts per token vary by token (topp, remoe, moe_plus_plus, expert_choice): the runner
    # reports `experts_per_token` (`variants.experts_per_token_stats`) and counts active FLOPs
    # and parameters from its measured mean, not from top_k
    variable_k: ClassVar[bool] = False
    # the layer takes `gate_residual=` (the previous MoE layer's `out.extras["gate_logits"]`)
    # and returns its own (MoE++'s gating residuals); models chain them from layer to layer
    takes_gate_residual: ClassVar[bool] = False
    # the router reads the tokens' ids (`token_ids=`, hash routing): a forward without them is
    # a ValueError. Every layer accepts `token_ids=`; the others ignore it
    uses_token_ids: ClassVar[bool] = False
    # each token picks its experts (token choice) rather than each expert its tokens (expert
    # choice): only token-choice routing can run on a rank's own tokens (expert parallelism)
    token_choice: ClassVar[bool] = True
    # the combine weight scales the expert's input, `FFN_e(w x)`, not its output (Llama 4);
    # the layer and the expert-parallel wrapper run the backend through
    # `variants.compute.input_weighted`
    weight_on_input: ClassVar[bool] = False
    # how the variant normalises its auxiliary losses, in words for the report (formulas as
    # the README's variants table states them); "" where a class adds nothing to say
    note: ClassVar[str] = ""

    d_model: int = 512
    num_experts: int = 8
    expert_hidden: int = 1024
    top_k: int = 2
    num_shared_experts: int = 0
    activation: str = "gelu"
    capacity_factor: float | None = None
    backend: str = "loop"
    force_uniform_routing: bool = False
    router_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def leaks_future_tokens(self) -> bool:
        """Whether a token's experts depend on later tokens of its own sequence."""
        return False

    @property
    def draws_over_the_batch(self) -> bool:
        """Whether its training routing makes random draws in passes over the whole forward
        (all tokens' first draws, then all tokens' second draws), so a batch split into
        several forwards gives the same tokens other numbers and other sampled choices. A
        variant drawing once per token in token order keeps one stream under a split and says
        False; the invariance suite states, rather than judges, the routing of one that says
        True under such a split."""
        return False

    @property
    def loss_scope(self) -> str:
        """Over which tokens the auxiliary losses are counted (one of `BALANCE_SCOPES`):
        `micro_batch`, the tokens of one forward, so a batch run as several forwards (micro-
        batches, ranks) has other losses than one forward; `sequence` or `global_batch`,
        unchanged by such a split along sequences. The invariance suite
        (`moe_bench.invariance`) reads it; a variant whose losses do not change under a split
        says so here."""
        return "micro_batch"

    def validate(self) -> None:
        check_int(self, "d_model", 1)
        check_int(self, "num_experts", 1)
        check_int(self, "expert_hidden", 1)
        self.check_top_k(self.top_k)
        check_le(self, "top_k", "num_experts")
        check_int(self, "num_shared_experts", 0)
        check_choice(self, "activation", ACTIVATIONS)
        if self.capacity_factor is not None:
            check_number(self, "capacity_factor", positive=True)
            if self.dropless is not None:
                raise ValueError(
                    f"capacity_factor={self.capacity_factor} must be None ({self.dropless})"
                )
        # backends declare what they compute beside their code (the one check: BackendSpec.check)
        get_backend(self.backend).check(self)
        if not isinstance(self.force_uniform_routing, bool):
            raise ValueError(
                f"force_uniform_routing={self.force_uniform_routing!r} must be true or false"
            )
        check_choice(self, "router_dtype", tuple(ROUTER_DTYPES))

    @classmethod
    def check_top_k(cls, top_k: Any) -> None:
        """top_k alone: a whole number >= 1, and the paper's value where the paper fixes it.
        (`top_k <= num_experts` needs the sizes, checked in `validate`.)"""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be a whole number >= 1 and <= num_experts")
        if cls.fixed_top_k is not None and top_k != cls.fixed_top_k[0]:
            k, why = cls.fixed_top_k
            raise ValueError(f"top_k={top_k} must be {k} {why}")

    def at_depth(self, moe_index: int) -> MoEConfig:
        """The config of a model's `moe_index`-th MoE layer (0-based): this one, unless the
        variant's layers differ with depth (DeepSeek-V4 hash-routes its first layers)."""
        return self

    def active_width(self) -> float:
        """Hidden units a token activates: the width of the dense FFN of equal active FLOPs
        (routed top_k experts of expert_hidden, shared experts of shared_width)."""
        return self.expert_hidden * self.top_k + self.shared_width * self.num_shared_experts

    @classmethod
    def from_fields(cls, variant: str, fields: dict[str, Any]) -> MoEConfig:
        """Build from keyword fields; an unknown field names itself and the allowed ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"{unknown[0]}={fields[unknown[0]]!r} is not a field of variant {variant!r}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        return cls(**fields)

    @property
    def shared_width(self) -> int:
        """Hidden width of one shared expert (`shared_hidden` where a variant has it)."""
        return self.expert_hidden

    def ffn_experts_per_token(self, routing: Any = None) -> float:
        """Routed FFN experts a token passes through: top_k, or for a `variable_k` variant the
        measured mean of `routing` (a `variants.Routing`; zero-computation experts of
        moe_plus_plus are not in it, so they count as free). Shared experts not included."""
        if self.variable_k and routing is not None:
            return experts_per_token_stats(routing)["mean"]
        return float(self.top_k)

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity `ceil(capacity_factor * T * K / E)`, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)


@dataclass
class SharedExpertConfig(MoEConfig):
    """Qwen2-MoE options on the DeepSeekMoE family (HF transformers `Qwen2MoeSparseMoeBlock`).

    - `shared_gate`: the shared experts' summed output is scaled per token by
      sigmoid(x @ w_g), w_g [1, D] (`layer.shared_gate.weight`; Qwen2-MoE's `shared_expert_gate`).
    - `shared_hidden`: the hidden width of each shared expert (Qwen2-MoE's
      `shared_expert_intermediate_size`); None keeps `expert_hidden`.
    - `norm_topk_prob`: renormalise the selected top-K routing weights to sum to 1.
    """

    shared_gate: bool = False
    shared_hidden: int | None = None
    norm_topk_prob: bool = False

    @property
    def shared_width(self) -> int:
        return self.shared_hidden or self.expert_hidden

    def validate(self) -> None:
        super().validate()
        for name in ("shared_gate", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.shared_hidden is not None:
            check_int(self, "shared_hidden", 1)
            if self.num_shared_experts == 0:
                raise ValueError(
                    f"shared_hidden={self.shared_hidden} needs num_shared_experts >= 1 "
                    "(num_shared_experts=0)"
                )
        if self.shared_gate and self.num_shared_experts == 0:
            raise ValueError(
                "shared_gate=True needs num_shared_experts >= 1 (num_shared_experts=0)"
            )


@dataclass
class BalanceScopeConfig(MoEConfig):
    """`balance_scope`: over which tokens the f_i of a `sum_i f_i P_i` balance loss is counted.

    - `micro_batch`: the tokens of this forward (Switch, GShard, DeepSeekMoE, Mixtral as written).
    - `sequence`: per sequence, then averaged over sequences (DeepSeek-V2/V3's form).
    - `global_batch`: every training forward of the optimizer step, and every data-parallel rank
      (Qiu et al. 2025, "Demons in the Detail", arXiv:2501.11873). P_i stays the micro-batch's,
      so each micro-batch's gradient is its own; only the counts are global. See
      `variants.contract.routing.scoped_balance_inputs` for how the counts reach the layer.
    """

    balance_scope: str = "micro_batch"

    @property
    def loss_scope(self) -> str:
        return self.balance_scope

    def validate(self) -> None:
        super().validate()
        check_choice(self, "balance_scope", BALANCE_SCOPES)


@dataclass
class RouterGradConfig(MoEConfig):
    """`router_grad`: how the router's gradient is estimated, on token-choice top-K variants.

    - `topk` (default): only the kept assignments' weights reach the router (today's layers,
      bit for bit).
    - `default_moe`: Default MoE (Panda et al. 2025, arXiv:2504.12463): every expert a token
      did not use stands in with `default_output[i]`, an exponential moving average (decay
      `default_moe_decay`) of expert i's mean output, so the router gets a dense gradient.
      The forward output is unchanged (`variants.contract.router_grad.DefaultMoE`).
    - `sparsemixer`: SparseMixer (GRIN, Liu et al. 2024, arXiv:2409.12136; Phi-3.5-MoE's
      router, `variants.contract.sparsemixer`) picks the two experts and their weights from
      the router's logits in place of the variant's top-2 rule: within a relative band
      `2 * jitter_eps` of the best remaining logit, argmax in eval, sampled in training, where
      its Heun's-method estimator gives the router's gradient. Needs top_k=2 and a router that
      selects by softmax logits (`no_sparsemixer` None); the variant's own weight rule
      (renormalisation, `norm_topk_prob`) gives way to SparseMixer's weights.
    `jitter_eps` [0.01, Phi-3.5-MoE's `router_jitter_noise`] is read by `sparsemixer` only.
    """

    # why the variant's router cannot select by SparseMixer (`router_grad="sparsemixer"`);
    # None where its router selects through `Router.select` on softmax logits
    no_sparsemixer: ClassVar[str | None] = "its router does not select by softmax logits"
    router_grad: str = "topk"
    default_moe_decay: float = 0.9
    jitter_eps: float = 0.01

    @property
    def draws_over_the_batch(self) -> bool:
        # SparseMixer samples every token's first choice, then every second (HF's order)
        return self.router_grad == "sparsemixer"

    def validate(self) -> None:
        super().validate()
        check_choice(self, "router_grad", ROUTER_GRADS)
        check_number(self, "default_moe_decay", minimum=0)
        if self.default_moe_decay >= 1:
            raise ValueError(f"default_moe_decay={self.default_moe_decay} must be < 1")
        check_number(self, "jitter_eps", minimum=0)
        if self.router_grad != "sparsemixer":
            return
        others = "'topk' or 'default_moe'"
        if self.top_k != 2:
            raise ValueError(
                f"router_grad='sparsemixer' needs top_k=2 (SparseMixer picks two experts), not "
                f"top_k={self.top_k}; allowed here: {others}"
            )
        if self.no_sparsemixer is not None:
            raise ValueError(
                f"router_grad='sparsemixer' is not allowed here ({self.no_sparsemixer}); "
                f"allowed: {others}"
            )
        # the Qwen2-MoE option (`SharedExpertConfig`) would rescale SparseMixer's weights
        if getattr(self, "norm_topk_prob", False):
            raise ValueError(
                "norm_topk_prob=True does not apply with router_grad='sparsemixer' (its "
                "weights are SparseMixer's); set norm_topk_prob=False"
            )
