"""Device-aware step timer (a layer interleaved with its reference) and peak-memory meter.

Time: on CUDA, a pair of CUDA events around each step and a synchronize per round (host timers
would measure kernel launches, not kernels); on CPU, `time.perf_counter`. `time_pair` times
two steps interleaved in one loop: both run `warmup` times untimed first (allocator growth,
caches, lazy initialisation), then each of `repeats` rounds times A then B, so a change of load,
clock or cache state hits both alike; the ratio of the two is the median of the per-round
ratios, not a ratio of medians. The median, the interquartile range and min/max describe the
samples, and `noisy` flags a spread past NOISY_IQR (IQR over median) or NOISY_MAX_MIN (max over
min): docs/contract.md, section 5.

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
from collections.abc import Callable, Iterable, Iterator
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

NOISY_IQR = 0.10  # interquartile range over median above this: noisy
NOISY_MAX_MIN = 2.0  # slowest over fastest sample above this: noisy


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

    @property
    def noisy(self) -> bool:
        """The spread passes a threshold: IQR > NOISY_IQR x median, or max > NOISY_MAX_MIN x min."""
        too_wide = self.relative_iqr > NOISY_IQR
        return too_wide or self.max_ms > NOISY_MAX_MIN * self.min_ms

    def spread(self) -> dict[str, Any]:
        """The columns of a timing row: iqr_ms, min_ms, max_ms, repeats, noisy."""
        return {
            "iqr_ms": self.iqr_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "repeats": len(self.samples_ms),
            "noisy": self.noisy,
        }


def ratio(a_ms: float, b_ms: float) -> float:
    return a_ms / b_ms if b_ms > 0 else math.inf


@dataclass
class PairTiming:
    """Step A and step B timed interleaved; `ratio`: the per-round ratios A / B."""

    a: Timing
    b: Timing

    @property
    def ratio(self) -> Timing:
        return Timing([ratio(a, b) for a, b in zip(self.a.samples_ms, self.b.samples_ms)])


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


def precise(ratios: list[float], precision: float) -> bool:
    """The median ratio is known within +-precision (relative, 95% confidence)."""
    return median_ci_halfwidth(ratios) <= precision * statistics.median(ratios)


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
    """Warm up A and B (A B A B ...), then time rounds of A and B: `repeats` of them, and more,
    up to `max_repeats`, until the median per-round ratio A / B is known within +-precision."""
    for _ in range(warmup):
        a()
        b()
    synchronize(device)
    timer = _StepTimer(device, clock)
    a_ms: list[float] = []
    b_ms: list[float] = []
    ratios: list[float] = []
    limit = max(repeats, max_repeats or repeats)
    bar = tqdm(total=repeats, desc=desc, unit="round", leave=False, disable=None)
    with gc_paused(), bar:
        while len(ratios) < limit and (len(ratios) < repeats or not precise(ratios, precision)):
            if len(ratios) % 2 == 0:
                read_a, read_b = timer(a), timer(b)
            else:  # B first every other round: neither step always runs first in a round
                read_b, read_a = timer(b), timer(a)
            synchronize(device)
            a_ms.append(read_a())
            b_ms.append(read_b())
            ratios.append(ratio(a_ms[-1], b_ms[-1]))
            if len(ratios) > bar.total:
                bar.total = len(ratios) + 1  # extra rounds for precision
            bar.update()
    return PairTiming(Timing(a_ms), Timing(b_ms))


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
