"""An estimate of a dropless MoE step's time against dense, from its unavoidable parts.

    python scripts/speed_floor.py --size quick

How close can `grouped` get to dense? This times, interleaved round by round with
the dense step of `speed_table.py` (same sizes, fp32, 2 threads, SwiGLU), the parts any dropless
layer of a size must run, each in the fastest of the forms of torch ops listed (per round, the
fastest form counts; a minimum over noisy forms leans low):
- routed GEMMs: the GEMMs of forward+backward on pre-gathered rows with every expert exactly
  equally loaded (A/E rows each): no padding, no gather, no dispatch; one `bmm`, one `mm` per
  expert, or one `mm` per expert with w1|w3 side by side;
- router and shared GEMMs: x @ W_r and the shared SwiGLU FFN, forward+backward;
- data movement: gather x to the A rows, scatter-add the outputs back, gather the output
  gradient, scatter-add the input gradient ([A, D] each; one gather fewer than `grouped`, which
  regathers x in backward instead of saving it), whole or per expert;
- routing: softmax over E, top-K, a stable sort of the A assignments by expert (forward only);
- activations: the dense step minus its own GEMMs (SwiGLU over the same number of hidden
  elements, T*(K+S)*H, as the routed layer, plus the dense layer's autograd and bookkeeping).
Left out: combine-weight products, the backward of softmax and top-K, per-expert bookkeeping,
Python. Each part is timed alone, so the sum is an estimate, not a bound: inside a layer, rows
gathered right before their GEMM are still in cache. Each row of the output is the median over
rounds of (the parts so far) / dense, with its interquartile range.

Shape legend: T tokens, D model width, E routed experts, K experts per token, H expert width,
S shared experts, A = T*K assignments, N = A/E rows per expert, F dense width, M any row count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_bench.bench.cases import training_step  # noqa: E402
from moe_bench.timing import quartiles  # noqa: E402
from scripts.speed_table import SIZES, layers  # noqa: E402

Step = Callable[[], object]


def ffn_gemms(x_MD, gy_MD, a_MH, w1_DH, w3_DH, w2_HD) -> None:
    """The 9 GEMMs of a SwiGLU FFN's forward+backward, on [M, *] matrices or on [G, M, *]
    batches (one tensor stands in for both hidden gradients dh1 and dh3)."""
    batched = x_MD.dim() == 3
    mm, addmm = (torch.bmm, torch.baddbmm) if batched else (torch.mm, torch.addmm)
    mm(x_MD, w1_DH)  # forward
    mm(x_MD, w3_DH)
    mm(a_MH, w2_HD)
    dh_MH = mm(gy_MD, w2_HD.transpose(-1, -2))  # backward
    mm(a_MH.transpose(-1, -2), gy_MD)
    addmm(mm(dh_MH, w1_DH.transpose(-1, -2)), dh_MH, w3_DH.transpose(-1, -2))
    mm(x_MD.transpose(-1, -2), dh_MH)
    mm(x_MD.transpose(-1, -2), dh_MH)


def fused_ffn_gemms(x_MD, gy_MD, a_MH, w13_D2H, w2_HD) -> None:
    """The same FLOPs with w1|w3 side by side: 6 GEMMs, three of them twice as wide."""
    h13_M2H = x_MD @ w13_D2H  # forward
    a_MH @ w2_HD
    gy_MD @ w2_HD.T  # backward
    a_MH.T @ gy_MD
    h13_M2H @ w13_D2H.T  # h13 stands in for its gradient
    x_MD.T @ h13_M2H


def parts(size: str) -> dict[str, dict[str, Step]]:
    """Per part, its forms (each a no-argument step); first dense and dense's own GEMMs."""
    T, D, E, K, H, S, _ = SIZES[size]
    A, g = T * K, torch.Generator().manual_seed(0)
    N = A // E

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    x_TD, gy_TD = r(T, D), r(T, D)
    x_END, gy_END, a_ENH = r(E, N, D), r(E, N, D), r(E, N, H)
    w1_EDH, w3_EDH, w2_EHD = r(E, D, H), r(E, D, H), r(E, H, D)
    w13_ED2H = torch.cat([w1_EDH, w3_EDH], -1)
    wr_DE = r(D, E)
    s1_DH, s3_DH, s2_HD, a_TH = r(D, S * H), r(D, S * H), r(S * H, D), r(T, S * H)  # S*H wide
    s13_D2H = torch.cat([s1_DH, s3_DH], -1)
    logits_TE = r(T, E)
    # a real routing's row order: by expert, tokens ascending within each (a stable sort)
    expert_A = logits_TE.topk(K, -1).indices.reshape(-1)
    token_A = torch.arange(T).repeat_interleave(K)[torch.argsort(expert_A, stable=True)]
    token_EN = token_A.view(E, N)  # every expert takes N rows: the balanced best case
    y_TD = torch.zeros_like(x_TD)  # the scatters' target; it keeps accumulating, harmlessly

    def router() -> None:
        logits = x_TD @ wr_DE
        logits @ wr_DE.T  # the logits stand in for their gradient
        x_TD.T @ logits

    def move(index_M: torch.Tensor) -> None:
        y_TD.index_add_(0, index_M, x_TD.index_select(0, index_M))
        y_TD.index_add_(0, index_M, gy_TD.index_select(0, index_M))

    def routing() -> None:
        expert_TK = torch.softmax(logits_TE, -1).topk(K, -1).indices
        torch.argsort(expert_TK.reshape(-1), stable=True)

    dense = layers(size, ("dense",))["dense"]
    F = dense.experts.hidden
    d1_DF, d3_DF, d2_FD, a_TF = r(D, F), r(D, F), r(F, D), r(T, F)
    per_expert = [(x_END[e], gy_END[e], a_ENH[e]) for e in range(E)]
    return {
        "dense": {"": training_step(dense, x_TD.clone().requires_grad_(), gy_TD)},
        "dense GEMMs": {"": lambda: ffn_gemms(x_TD, gy_TD, a_TF, d1_DF, d3_DF, d2_FD)},
        "routed GEMMs": {
            "one bmm": lambda: ffn_gemms(x_END, gy_END, a_ENH, w1_EDH, w3_EDH, w2_EHD),
            "mm per expert": lambda: [
                ffn_gemms(*rows, w1_EDH[e], w3_EDH[e], w2_EHD[e])
                for e, rows in enumerate(per_expert)
            ],
            "mm per expert, w1|w3": lambda: [
                fused_ffn_gemms(*rows, w13_ED2H[e], w2_EHD[e]) for e, rows in enumerate(per_expert)
            ],
        },
        "router and shared GEMMs": {
            "": lambda: (router(), ffn_gemms(x_TD, gy_TD, a_TH, s1_DH, s3_DH, s2_HD)),
            "w1|w3": lambda: (router(), fused_ffn_gemms(x_TD, gy_TD, a_TH, s13_D2H, s2_HD)),
        },
        "gathers and scatters [A, D]": {
            "whole": lambda: move(token_A),
            "per expert": lambda: [move(token_EN[e]) for e in range(E)],
        },
        "softmax, top-K, sort": {"": routing},
    }


def timed_rounds(steps: dict[str, dict[str, Step]], rounds: int) -> dict[str, dict[str, list]]:
    """Milliseconds of every form of every part, per round. Each round runs every step once,
    starting one step later than the round before, so no step always follows the same one."""
    order = [(part, form) for part, forms in steps.items() for form in forms]
    for part, form in order:  # warm up
        steps[part][form]()
    ms = {part: {form: [] for form in forms} for part, forms in steps.items()}
    for i in range(rounds):
        for part, form in order[i % len(order) :] + order[: i % len(order)]:
            t0 = time.perf_counter()
            steps[part][form]()
            ms[part][form].append((time.perf_counter() - t0) * 1e3)
    return ms


Row = tuple[str, dict[str, float], tuple[float, float, float]]


def cumulative(ms: dict[str, dict[str, list[float]]], dense_ms: list[float]) -> list[Row]:
    """Per part, in order: (part, each form's median ms, quartiles of the cumulative ratio).

    Round i's cumulative ratio sums each part so far at its fastest form in round i and
    divides by dense's time in round i (the parts and dense ran interleaved in that round).
    """
    rows, total = [], [0.0] * len(dense_ms)
    for part, forms in ms.items():
        total = [t + min(column) for t, column in zip(total, zip(*forms.values()))]
        medians = {form: statistics.median(samples) for form, samples in forms.items()}
        rows.append((part, medians, quartiles([t / d for t, d in zip(total, dense_ms)])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="quick")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ms = timed_rounds(parts(args.size), args.rounds)
    dense, dense_gemms = ms.pop("dense")[""], ms.pop("dense GEMMs")[""]
    ms["activations (dense step - its GEMMs)"] = {"": [d - g for d, g in zip(dense, dense_gemms)]}
    T, D, E, K, H, S, _ = SIZES[args.size]
    print(
        f"size {args.size}: T={T} D={D} E={E} K={K} H={H} shared={S}; dense step "
        f"{statistics.median(dense):.1f} ms (median of {args.rounds} rounds)"
    )
    print("| part | ms (median) | cumulative / dense: median (IQR) |\n|---|---|---|")
    for part, medians, (q1, q2, q3) in cumulative(ms, dense):
        shown = ", ".join(f"{form} {m:.1f}".strip() for form, m in medians.items())
        print(f"| + {part} | {shown} | {q2:.2f}x ({q1:.2f}-{q3:.2f}) |")


if __name__ == "__main__":
    main()
