"""Measure the two costs behind `grouped`'s CPU path choice (`variants.compute.dispatch`).

`padded_rows_cheaper` pads a group of experts to its largest load when the GEMM work on the
pad rows costs less than the per-expert dispatch it saves, from three constants:
- FLOP_SECONDS: seconds per GEMM FLOP of a row on the padded_bmm path (a pad row costs a real
  row's forward+backward FLOPs, 2*D*H per projection and 3 GEMMs per projection);
- PER_EXPERT_OPS * OP_SECONDS: seconds one more non-empty expert costs on the per_expert path.

This script times both at the quick benchmark size (D=128, H=32, swiglu, fp32, forward +
backward), interleaved round by round, in one process:
- per expert: the per_expert path on A = 16384 rows spread evenly over 64 experts against the
  same rows over 8 experts (same GEMM FLOPs); (t64 - t8) / 56 per round;
- per FLOP: the padded_bmm path with every one of 64 experts at 256 rows against 208 rows (4
  experts per bmm group either way, no pad rows); the time difference over the FLOPs of the
  extra rows, per round.
Each prints the median over rounds and its interquartile range, beside the constants.

    python scripts/dispatch_cost.py [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from variants.compute import dispatch
from variants.compute.assignments import Routing, make_routing
from variants.compute.backends import grouped
from variants.compute.experts import ExpertBank

D, H, T = 128, 32, 2048
PROJECTIONS = 3  # swiglu: w1, w3, w2
# (experts, rows per expert, path): the per-expert pair, then the padded pair
CASES = [
    (64, 256, "per_expert"),
    (8, 2048, "per_expert"),
    (64, 256, "padded_bmm"),
    (64, 208, "padded_bmm"),
]


def balanced_routing(num_experts: int, per_expert: int) -> Routing:
    """Every expert `per_expert` rows; row a goes to expert a % E, token a % T."""
    A = num_experts * per_expert
    a = torch.arange(A)
    expert_A = a % num_experts
    scores_TE = torch.zeros(T, num_experts)
    demand_E = torch.full((num_experts,), per_expert)
    return make_routing(a % T, expert_A, torch.rand(A), scores_TE, scores_TE, demand_E)


def step_seconds(
    x_TD: torch.Tensor, bank: ExpertBank, routing: Routing, path: str, reps: int = 3
) -> float:
    """Fastest of `reps` forward+backward passes of the grouped backend on `path`."""
    best = float("inf")
    for _ in range(reps):
        x = x_TD.detach().requires_grad_()
        weight = routing.weight.detach().requires_grad_()
        r = Routing(**{**routing.__dict__, "weight": weight})
        start = time.perf_counter()
        y_TD = grouped(x, r, bank, path=path).y_TD
        y_TD.sum().backward()
        best = min(best, time.perf_counter() - start)
        bank.zero_grad(set_to_none=True)
    return best


def spread(values: list[float]) -> str:
    q1, med, q3 = statistics.quantiles(values, n=4)
    return f"median {med:.3g} (IQR {q1:.3g} .. {q3:.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x_TD = torch.randn(T, D)
    cases = {
        f"{path} E={E} n={n}": (ExpertBank(E, D, H, "swiglu"), balanced_routing(E, n), path)
        for E, n, path in CASES
    }
    for bank, routing, path in cases.values():  # warm-up
        step_seconds(x_TD, bank, routing, path, reps=2)
    per_expert, per_flop = [], []
    extra_flops = 64 * (256 - 208) * 2 * D * H * PROJECTIONS * 3
    for _ in range(args.rounds):  # interleaved: every case once per round
        t = {name: step_seconds(x_TD, *case) for name, case in cases.items()}
        t64, t8, t256, t208 = (t[name] for name in cases)
        per_expert.append((t64 - t8) / 56)
        per_flop.append((t256 - t208) / extra_flops)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, "
        f"{args.rounds} rounds, D={D} H={H} T={T} swiglu fp32 forward+backward, "
        f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    print(f"seconds per extra expert on the per_expert path: {spread(per_expert)}")
    print(
        f"  constants: PER_EXPERT_OPS * OP_SECONDS = {dispatch.PER_EXPERT_OPS} * "
        f"{dispatch.OP_SECONDS:.3g} = {dispatch.PER_EXPERT_OPS * dispatch.OP_SECONDS:.3g}"
    )
    print(f"seconds per GEMM FLOP of a row on the padded_bmm path: {spread(per_flop)}")
    print(f"  constant: FLOP_SECONDS = {dispatch.FLOP_SECONDS:.3g} (1 / 40e9)")


if __name__ == "__main__":
    main()
