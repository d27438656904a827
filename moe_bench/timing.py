"""Device-aware step timer (a layer interleaved with its reference) and peak-memory meter.

Time: on CUDA, a pair of CUDA events around each step and a synchronize per round (host timers
would measure kernel launches, not kernels); on CPU, `time.perf_counter`. `time_pair` times
two steps interleaved in one loop: both run `warmup` times untimed first (allocator growth,
caches, lazy initialisation), then each of `repeats` rounds times A then B, so a change of load,
clock or cache state hits both alike; the ratio of the two is the median of the per-round
ratios, not a ratio of medians. `time_rounds` does the same for any number of steps (the race
task's arms), rotating which step goes first each round. The median, the interquartile range
and min/max describe the samples; `ratio_noise` says whether a median ratio can be trusted,
from the 95% confidence interval of that median: docs/contract.md, section 5.

(`torch.utils.benchmark.Timer` handles CUDA sync and threads too, but it times blocks of one
statement and sets its own thread count; interleaving two steps per round needs this loop, the
runner sets threads (`device.threads`) and each row records them.)

Memory: on CUDA, the allocator's own peak (`max_memory_allocated` after
`reset_peak_memory_stats`). The CPU allocator keeps no peak, so on CPU `LiveTensorBytes` counts
tensor memory itself: a dispatch mode sees every op's outputs, adds the bytes of each new
storage and subtracts them once the storage is freed; the peak of that count, plus the
resident tensors (parameters, inputs) the step starts with, is the peak tensor memory. It is
exact and deterministic for a given routing; it does not see scratch space an op allocates and
frees inside itself, which the CUDA number includes.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

Step = Callable[[], Any]
Clock = Callable[[], float]  # seconds

# A median ratio is noisy when the half-width of its 95% confidence interval exceeds this
# fraction of it. Calibrated on a dense layer timed against its identical twin at the quick and
# tiny sizes (true ratio 1): scripts/calibrate_noise.py, output in
# reports/benchmarks/noise_calibration.txt (the runs, the machine and its load: a 2-core VM
# shared with other test runs, load average 12-21). There the interval held 1 in 17 of 18
# quick-size runs, and |ratio - 1| stayed within 6.3% in all of them: 7% trusts no interval
# narrower than the error the protocol delivers on a shared machine.
NOISY_RATIO_CI = 0.07
MIN_CI_ROUNDS = 6  # fewer rounds give no distribution-free 95% interval of the median


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); one sample is all three."""
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Timing:
    """Samples of one measurement (milliseconds, or unitless ratios) and their spread."""

    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        q1, _, q3 = quartiles(self.samples_ms)
        return q3 - q1

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    @property
    def relative_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    def spread(self) -> dict[str, Any]:
        """The spread columns of a timing row: iqr_ms, min_ms, max_ms, repeats."""
        return {
            "iqr_ms": self.iqr_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "repeats": len(self.samples_ms),
        }


def ratio(a_ms: float, b_ms: float) -> float:
    return a_ms / b_ms if b_ms > 0 else math.inf


def per_round(a_ms: list[float], b_ms: list[float]) -> list[float]:
    """The ratio a / b of each round."""
    return [ratio(a, b) for a, b in zip(a_ms, b_ms)]


@dataclass
class PairTiming:
    """Step A and step B timed interleaved; `ratio`: the per-round ratios A / B."""

    a: Timing
    b: Timing

    @property
    def ratio(self) -> Timing:
        return Timing(per_round(self.a.samples_ms, self.b.samples_ms))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while timing (as `timeit` does), then as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _StepTimer:
    """Milliseconds of one step: CUDA events on a CUDA device, else `clock` around the call."""

    def __init__(self, device: torch.device, clock: Clock) -> None:
        self.cuda, self.clock = device.type == "cuda", clock

    def __call__(self, step: Step) -> Callable[[], float]:
        """Run `step` now; returns how to read its time (after a synchronize on CUDA)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            return lambda: start.elapsed_time(end)
        t0 = self.clock()
        step()
        ms = (self.clock() - t0) * 1e3
        return lambda: ms


def median_ci_halfwidth(samples: list[float]) -> float:
    """Half the width of the distribution-free 95% confidence interval of the median (order
    statistics n/2 -+ 0.98 sqrt(n)); infinite below 6 samples."""
    n = len(samples)
    if n < 6 or not all(map(math.isfinite, samples)):
        return math.inf
    ordered, d = sorted(samples), 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - d)), min(n - 1, math.ceil(n / 2 + d) - 1)
    return (ordered[hi] - ordered[lo]) / 2


def relative_ci(ratios: list[float]) -> float:
    """The median's 95% confidence half-width over the median (infinite below 6 samples)."""
    median = statistics.median(ratios)
    return median_ci_halfwidth(ratios) / median if median > 0 else math.inf


def precise(ratios: list[float], precision: float) -> bool:
    """The median ratio is known within +-precision (relative, 95% confidence)."""
    return relative_ci(ratios) <= precision


def ratio_noise(ratios: list[float]) -> str:
    """Why the median of these per-round ratios cannot be trusted; "" when it can.

    The rule reads the quantity a comparison reads, the median per-round ratio, and asks
    whether its 95% interval is within NOISY_RATIO_CI of it. Load that hits both steps of a
    round alike cancels in the ratio and widens nothing; load that hits one step and not the
    other scatters the ratios and widens the interval."""
    if len(ratios) < MIN_CI_ROUNDS:
        return f"ratio CI undefined: {len(ratios)} rounds < {MIN_CI_ROUNDS}"
    rel = relative_ci(ratios)
    if rel > NOISY_RATIO_CI:
        return f"ratio CI ±{rel:.1%} > {NOISY_RATIO_CI:.0%}"
    return ""


def time_rounds(
    steps: Sequence[Step],
    device: torch.device,
    warmup: int,
    repeats: int,
    desc: str,
    clock: Clock = time.perf_counter,
    max_repeats: int | None = None,
    precision: float = 0.0,
) -> list[Timing]:
    """Warm up every step in turn, then time rounds of all of them, round-robin: round r starts
    at step r mod n, so no step always runs first (two steps: A B, B A, ...). `repeats` rounds,
    and more, up to `max_repeats`, until every step's median per-round ratio to the last step
    (the reference) is known within +-precision."""
    for _ in range(warmup):
        for step in steps:
            step()
    synchronize(device)
    timer = _StepTimer(device, clock)
    n = len(steps)
    samples: list[list[float]] = [[] for _ in steps]
    limit = max(repeats, max_repeats or repeats)

    def done() -> bool:
        rounds = len(samples[-1])
        if rounds < repeats:
            return False
        return rounds >= limit or all(
            precise(per_round(s, samples[-1]), precision) for s in samples[:-1]
        )

    bar = tqdm(total=repeats, desc=desc, unit="round", leave=False, disable=None)
    with gc_paused(), bar:
        while not done():
            first = len(samples[-1]) % n
            order = [*range(first, n), *range(first)]
            reads = {i: timer(steps[i]) for i in order}
            synchronize(device)
            for i in range(n):
                samples[i].append(reads[i]())
            if len(samples[-1]) > bar.total:
                bar.total = len(samples[-1]) + 1  # extra rounds for precision
            bar.update()
    return [Timing(s) for s in samples]


def time_pair(
    a: Step,
    b: Step,
    device: torch.device,
    warmup: int,
    repeats: int,
    desc: str,
    clock: Clock = time.perf_counter,
    max_repeats: int | None = None,
    precision: float = 0.0,
) -> PairTiming:
    """Warm up A and B (A B A B ...), then time rounds of A and B (A B, then B A, ...):
    `repeats` of them, and more, up to `max_repeats`, until the median per-round ratio A / B is
    known within +-precision."""
    a_time, b_time = time_rounds(
        [a, b], device, warmup, repeats, desc, clock, max_repeats=max_repeats, precision=precision
    )
    return PairTiming(a_time, b_time)


def time_steps(step: Step, device: torch.device, warmup: int, repeats: int, desc: str) -> Timing:
    """Run `step` warmup times, then time it `repeats` times (milliseconds per step)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    timer = _StepTimer(device, time.perf_counter)
    samples = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=None):
        read = timer(step)
        synchronize(device)
        samples.append(read())
    return Timing(samples)


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of live tensor storages created under it, plus `resident` ones."""

    def __init__(self, resident: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        for t in resident:
            self._add(t)
        self.peak = self.current

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(step: Step, device: torch.device, resident: Iterable[torch.Tensor]) -> int:
    """Peak bytes of tensor memory while `step` runs, resident tensors included."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with LiveTensorBytes(resident) as meter:
        step()
    return meter.peak
