"""A lower bound on a routed MoE step's time against dense, from its unavoidable parts.

    python scripts/speed_floor.py --size quick

Issue 18 asks how close `grouped` can get to dense. This times, interleaved round by round with
the dense step of `speed_table.py` (same sizes, fp32, 2 threads, SwiGLU), the parts any dropless
implementation of the layer must run, each in its fastest form measured (per round, the fastest
of the ways listed counts):
- routed GEMMs: the GEMMs of forward+backward on pre-gathered rows with every expert exactly
  equally loaded (A/E rows each): no padding, no gather, no dispatch; one `bmm`, one `mm` per
  expert, or one `mm` per expert with w1|w3 side by side;
- router and shared GEMMs: x @ W_r and the shared SwiGLU FFN, forward+backward;
- data movement: gather x to the A rows, scatter-add the outputs back, gather the output
  gradient, scatter-add the input gradient ([A, D] each; one gather fewer than `grouped`, which
  regathers x in backward instead of saving it), whole or per expert;
- routing: softmax over E, top-K, a stable sort of the A assignments by expert;
- activations: what the dense step spends beside its own GEMMs (SwiGLU and autograd over the
  same number of hidden elements, T*(K+S)*H, that the routed layer activates).
Left out: combine-weight products, per-expert bookkeeping, Python. Each row is the median over
rounds of (cumulative parts) / dense, with its interquartile range.
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

from moe_bench.timing import quartiles  # noqa: E402
from scripts.speed_table import SIZES, layers  # noqa: E402
from tests.benchmarks.cases import training_step  # noqa: E402


def ffn_gemms(x_ND, gy_ND, a_NH, w1_DH, w3_DH, w2_HD) -> None:
    """The 9 GEMMs of a SwiGLU FFN's forward+backward, on [N, *] matrices or [G, N, *] batches
    (the hidden gradients dh1 and dh3 are stood in for by one tensor)."""
    mm = torch.bmm if x_ND.dim() == 3 else torch.mm
    mm(x_ND, w1_DH), mm(x_ND, w3_DH), mm(a_NH, w2_HD)  # forward
    dh_NH = mm(gy_ND, w2_HD.transpose(-1, -2))  # backward
    mm(a_NH.transpose(-1, -2), gy_ND)
    mm(dh_NH, w1_DH.transpose(-1, -2)) + mm(dh_NH, w3_DH.transpose(-1, -2))
    mm(x_ND.transpose(-1, -2), dh_NH), mm(x_ND.transpose(-1, -2), dh_NH)


def fused_ffn_gemms(x_ND, gy_ND, a_NH, w13_DF, w2_HD) -> None:
    """The same work with w1|w3 side by side (F = 2H): 6 wider GEMMs instead of 9."""
    h13_NF = x_ND @ w13_DF  # forward
    a_NH @ w2_HD
    gy_ND @ w2_HD.T  # backward
    a_NH.T @ gy_ND
    h13_NF @ w13_DF.T, x_ND.T @ h13_NF  # h13 stands in for its gradient


def parts(size: str) -> dict[str, dict[str, Callable[[], object]]]:
    """Per part of the floor, its ways (each a no-argument step); and dense."""
    T, D, E, K, H, S, _ = SIZES[size]
    A, g = T * K, torch.Generator().manual_seed(0)
    N = A // E

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x_TD, gy_TD = r(T, D), r(T, D)
    x_END, gy_END, a_ENH = r(E, N, D), r(E, N, D), r(E, N, H)
    w1, w3, w2 = r(E, D, H), r(E, D, H), r(E, H, D)
    w13 = torch.cat([w1, w3], -1)
    wr, s1, s3, s2 = r(D, E), r(D, S * H), r(D, S * H), r(S * H, D)
    s13, a_TS = torch.cat([s1, s3], -1), r(T, S * H)
    logits_TE = r(T, E)
    # a real routing's row order: by expert, tokens ascending within each (a stable sort)
    expert_A = logits_TE.topk(K, -1).indices.reshape(-1)
    token_A = torch.arange(T).repeat_interleave(K)[torch.argsort(expert_A, stable=True)]
    token_EN = token_A.view(E, N)  # every expert takes N rows: the balanced best case

    def router():
        lg = x_TD @ wr
        lg @ wr.T, x_TD.T @ lg  # the logits stand in for their gradient

    def move(index_N):
        x_ND = x_TD.index_select(0, index_N)
        y_TD.index_add_(0, index_N, x_ND)
        g_ND = gy_TD.index_select(0, index_N)
        y_TD.index_add_(0, index_N, g_ND)

    y_TD = torch.zeros_like(x_TD)
    dense = layers(size, ("dense",))["dense"]
    F = dense.experts.hidden
    d1, d3, d2, a_TF = r(D, F), r(D, F), r(F, D), r(T, F)
    return {
        "dense": {"": training_step(dense, x_TD.clone().requires_grad_(), gy_TD)},
        "dense GEMMs": {"": lambda: ffn_gemms(x_TD, gy_TD, a_TF, d1, d3, d2)},
        "routed GEMMs": {
            "one bmm": lambda: ffn_gemms(x_END, gy_END, a_ENH, w1, w3, w2),
            "mm per expert": lambda: [
                ffn_gemms(x_END[e], gy_END[e], a_ENH[e], w1[e], w3[e], w2[e]) for e in range(E)
            ],
            "mm per expert, w1|w3": lambda: [
                fused_ffn_gemms(x_END[e], gy_END[e], a_ENH[e], w13[e], w2[e]) for e in range(E)
            ],
        },
        "router and shared GEMMs": {
            "": lambda: (router(), ffn_gemms(x_TD, gy_TD, a_TS, s1, s3, s2)),
            "w1|w3": lambda: (router(), fused_ffn_gemms(x_TD, gy_TD, a_TS, s13, s2)),
        },
        "gathers and scatters [A, D]": {
            "whole": lambda: move(token_A),
            "per expert": lambda: [move(token_EN[e]) for e in range(E)],
        },
        "softmax, top-K, sort": {
            "": lambda: torch.argsort(
                torch.softmax(logits_TE, -1).topk(K, -1).indices.reshape(-1), stable=True
            )
        },
    }


Row = tuple[str, dict[str, float], tuple[float, float, float]]


def cumulative(ms: dict[str, dict[str, list[float]]], dense_ms: list[float]) -> list[Row]:
    """Per part, in order: (part, each way's median ms, quartiles of the cumulative ratio).

    Round i's cumulative ratio sums each part so far at its fastest way in round i and
    divides by dense's time in round i (the parts and dense ran interleaved in that round).
    """
    rows, total = [], [0.0] * len(dense_ms)
    for part, ways in ms.items():
        total = [t + min(column) for t, column in zip(total, zip(*ways.values()))]
        medians = {way: statistics.median(samples) for way, samples in ways.items()}
        rows.append((part, medians, quartiles([t / d for t, d in zip(total, dense_ms)])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="quick")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = [(part, way, f) for part, ways in parts(args.size).items() for way, f in ways.items()]
    for _, _, f in steps:  # warm up
        f(), f()
    ms: dict[str, dict[str, list[float]]] = {}
    for part, way, _ in steps:
        ms.setdefault(part, {})[way] = []
    for i in range(args.rounds):
        for part, way, f in steps[i % len(steps) :] + steps[: i % len(steps)]:  # rotate
            t0 = time.perf_counter()
            f()
            ms[part][way].append((time.perf_counter() - t0) * 1e3)
    dense, dense_gemms = ms.pop("dense")[""], ms.pop("dense GEMMs")[""]
    ms["activations (dense step - its GEMMs)"] = {"": [d - g for d, g in zip(dense, dense_gemms)]}
    T, D, E, K, H, S, _ = SIZES[args.size]
    print(
        f"size {args.size}: T={T} D={D} E={E} K={K} H={H} shared={S}; dense step "
        f"{statistics.median(dense):.1f} ms (median of {args.rounds} rounds)"
    )
    print("| part | ms (median) | cumulative / dense: median (IQR) |\n|---|---|---|")
    for part, medians, (q1, q2, q3) in cumulative(ms, dense):
        shown = ", ".join(f"{way} {m:.1f}".strip() for way, m in medians.items())
        print(f"| + {part} | {shown} | {q2:.2f}x ({q1:.2f}-{q3:.2f}) |")


if __name__ == "__main__":
    main()
