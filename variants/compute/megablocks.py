"""megablocks (Gale et al. 2023, arXiv:2211.15841) as a compute backend: our routers decide,
megablocks' dropless grouped kernels compute. GPU only; imported lazily so that the base
install never needs it.

Shape legend: T tokens, D model width, H expert hidden width, E experts, K kept assignments per
token, A = T*K kept assignments (token-major: assignment a belongs to token a // K).

What runs is megablocks 0.10.0's `ParallelDroplessMLP.grouped_forward_once`
(megablocks/layers/dmoe.py) step by step, with our Routing in place of its router and our
ExpertBank's weights in place of its GroupedMLP's:
  indices_and_bins   ops.sort (radix sort of expert ids), ops.histogram, ops.inclusive_cumsum
  ops.gather         rows of x in expert order: row i is x[indices[i] // K]
  expert MLP         grouped_gemm's gmm per projection, as GroupedMLP / GroupedGLU.forward
  ops.scatter        rows times their combine weight, back to tokens, summed over the K slots

Weights: megablocks stores w1 (and GLU's v1) as [E*H, D], viewed [E, H, D] and multiplied with
trans_b=True, and w2 as [E*H, D], viewed [E, H, D]. Our w1/w3 [E, D, H] hold the same numbers
transposed, so gmm takes them as they are with trans_b=False; our w2 [E, H, D] is megablocks'
w2 layout exactly. No weight is copied per forward, and grouped_gemm's autograd returns the
gradients straight to bank.w1/w2/w3.

Activation: the bank's own (exact erf gelu, or silu-gated for swiglu). megablocks' default
activation_fn is tanh-approximate gelu; it is not used here.

What megablocks cannot express raises ValueError naming backend='megablocks':
- drops and uneven counts: its interface is "every token keeps exactly top_k assignments";
  a routing with a capacity, GShard's random second choice in training, or expert choice (0..E
  experts per token) has no such layout.
- dtypes other than bfloat16: grouped_gemm's kernels accept bfloat16 only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

from .assignments import Routing
from .experts import ExpertBank

INSTALL_HINT = (
    "pip install --no-build-isolation --no-deps megablocks==0.10.0 stanford-stk==0.7.1 "
    "grouped_gemm==0.3.0 (builds CUDA extensions against the torch already installed; "
    "megablocks itself pins torch 2.7.0, hence --no-deps; see the 'gpu' extra)"
)
# grouped_gemm's kernels check `scalar_type() == kBFloat16` (tgale96/grouped_gemm, csrc).
GROUPED_GEMM_DTYPES = (torch.bfloat16,)


class Kernels(NamedTuple):
    """The megablocks pieces the backend calls, as one value so tests can pass plain-torch fakes."""

    ops: ModuleType  # megablocks.ops: sort, histogram, inclusive_cumsum, gather, scatter
    gmm: Callable[..., torch.Tensor]  # grouped_gemm.ops.gmm(a, b, batch_sizes, trans_b=False)


class Unavailable(RuntimeError):
    """What this machine lacks (a CUDA device, the megablocks install): not a bug, one line."""


def require_megablocks(what: str = "backend='megablocks'") -> None:
    """Raise a clear `Unavailable` unless CUDA, megablocks and grouped_gemm are all available.

    CUDA is checked first: megablocks' compiled ops cannot even be imported without a driver.
    """
    if not torch.cuda.is_available():
        raise Unavailable(
            f"{what} needs a CUDA device, and torch.cuda.is_available() is False: megablocks "
            "runs on GPU only (on CPU, backend 'grouped' is the dropless grouped compute)"
        )
    try:
        from megablocks import grouped_gemm_util
    except ImportError as err:
        raise Unavailable(f"{what} needs the megablocks package ({err}): {INSTALL_HINT}") from err
    if grouped_gemm_util.ops is None:  # megablocks imports without it, only warning
        raise Unavailable(
            f"{what} needs grouped_gemm (megablocks' mlp_impl='grouped'): {INSTALL_HINT}"
        )


def load_kernels() -> Kernels:
    """megablocks' routing ops and the grouped GEMM it uses."""
    require_megablocks()
    import megablocks.ops as ops
    from megablocks import grouped_gemm_util

    return Kernels(ops=ops, gmm=grouped_gemm_util.ops.gmm)


def check_dtype(dtype: torch.dtype, what: str = "backend='megablocks'") -> None:
    if dtype not in GROUPED_GEMM_DTYPES:
        raise ValueError(
            f"{what} computes with grouped_gemm, which supports bfloat16 only; got "
            f"dtype={dtype}: run with dtype=bfloat16"
        )


def check_tensors(x_TD: torch.Tensor, bank: ExpertBank) -> None:
    """Input and weights in bfloat16 and on CUDA, before any megablocks kernel sees them."""
    for name, t in (("input", x_TD), *bank.named_parameters()):
        check_dtype(t.dtype, f"backend='megablocks' ({name})")
        if not t.is_cuda:
            raise ValueError(
                f"backend='megablocks' needs CUDA tensors, but {name} is on device={t.device}; "
                "move the layer and its input to cuda"
            )


def top_k_of(routing: Routing) -> int:
    """K such that the routing is megablocks' layout: T*K assignments, token t's at [tK, tK+K).

    Every token-choice router here lists assignments token-major (`flatten_topk`), so a
    dropless routing passes; capacity drops, GShard's random routing and expert choice do not.
    """
    if routing.capacity is not None:
        raise ValueError(
            f"backend='megablocks' computes dropless routings only, but this routing has "
            f"capacity={routing.capacity}: set capacity_factor=None, or use backend 'padded', "
            "'grouped' or 'loop'"
        )
    T, A = routing.num_tokens, routing.token.numel()
    K = A // T if T else 0
    token_major_A = torch.arange(T, device=routing.token.device).repeat_interleave(K)
    if A != T * K or not torch.equal(routing.token, token_major_A):
        raise ValueError(
            f"backend='megablocks' needs every token to keep the same number of assignments, "
            f"listed token by token (megablocks' top_k layout); this routing keeps {A} for "
            f"{T} tokens otherwise (capacity drops, GShard's random second choice in "
            "training, expert choice): use backend 'grouped', 'padded' or 'loop'"
        )
    return K


def indices_and_bins(
    ops: ModuleType, expert_A: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """megablocks' `ParallelMLP.indices_and_bins`: (indices, bin_ids, bins, tokens_per_expert).

    indices_A: flat assignment index of each row in expert order (a radix sort by expert id);
    bin_ids_A: the expert of each such row; bins_E: inclusive cumsum of the rows per expert.
    """
    end_bit = max(math.ceil(math.log2(num_experts)), 1)  # bits the radix sort looks at
    expert_A = expert_A.int()
    bin_ids_A, indices_A = ops.sort(expert_A, end_bit)
    tokens_per_expert_E = ops.histogram(expert_A, num_experts)
    bins_E = ops.inclusive_cumsum(tokens_per_expert_E, 0)
    bins_E = bins_E.view(1) if bins_E.dim() == 0 else bins_E  # E = 1 comes back 0-d
    return indices_A, bin_ids_A, bins_E, tokens_per_expert_E


def dropless_grouped(
    x_TD: torch.Tensor, routing: Routing, bank: ExpertBank, kernels: Kernels
) -> torch.Tensor:
    """`grouped_forward_once` on our routing and weights (module docstring); y_TD."""
    K = top_k_of(routing)
    if K == 0:  # no assignments at all: megablocks' kernels would launch empty grids
        return x_TD.new_zeros(x_TD.shape)
    ops = kernels.ops
    with torch.no_grad():
        indices_A, bin_ids_A, bins_E, tokens_per_expert_E = indices_and_bins(
            ops, routing.expert, bank.num_experts
        )
    x_AD = ops.gather(x_TD, indices_A, bin_ids_A, bins_E, K)
    # grouped_gemm wants the group sizes on the host, as GroupedMLP.forward passes them
    batch_sizes_E = tokens_per_expert_E.cpu().to(torch.long)
    h1_AH = kernels.gmm(x_AD, bank.w1, batch_sizes_E)
    h3_AH = kernels.gmm(x_AD, bank.w3, batch_sizes_E) if bank.w3 is not None else None
    out_AD = kernels.gmm(bank.act(h1_AH, h3_AH), bank.w2, batch_sizes_E)
    weight_A = routing.weight.to(x_TD.dtype)
    return ops.scatter(out_AD, indices_A, bin_ids_A, weight_A, bins_E, K)


def megablocks_forward(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """The `megablocks` backend: `(x_TD, routing, bank) -> y_TD` on megablocks' kernels."""
    kernels = load_kernels()
    check_tensors(x_TD, bank)
    return dropless_grouped(x_TD, routing, bank, kernels)
