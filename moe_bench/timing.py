"""Device-aware step timer and peak-memory meter.

Time: on CUDA, a pair of CUDA events around each step and a synchronize (host timers would
measure kernel launches, not kernels); on CPU, `time.perf_counter`. Steps run `warmup` times
untimed first (allocator growth, caches, lazy initialisation), then `repeats` timed times;
the median and interquartile range describe them.

Memory: on CUDA, the allocator's own peak (`max_memory_allocated` after
`reset_peak_memory_stats`). The CPU allocator keeps no peak, so on CPU `LiveTensorBytes` counts
tensor memory itself: a dispatch mode sees every op's outputs, adds the bytes of each new
storage and subtracts them once the storage is freed; the peak of that count, plus the
resident tensors (parameters, inputs) the step starts with, is the peak tensor memory. It is
exact and deterministic for a given routing; it does not see scratch space an op allocates and
frees inside itself, which the CUDA number includes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

Step = Callable[[], Any]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    samples_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q3 - q1


def time_steps(step: Step, device: torch.device, warmup: int, repeats: int, desc: str) -> Timing:
    """Run `step` warmup times, then time it `repeats` times (milliseconds per step)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=None):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
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
