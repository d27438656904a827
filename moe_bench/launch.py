"""Starting and joining the ranks of a multi-process job: on one machine (`spawn_ranks`) or
under a cluster launcher (`init_from_env`).

Expert parallelism (`variants.parallel.expert_parallel`) only needs an initialised process
group; how the processes start is the runner's business, so it lives here.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


class RankFailed(RuntimeError):
    """A rank raised, died, or the job ran past its timeout; the message holds the rank's error."""


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join ranks started by a cluster launcher (torchrun, Slurm/submitit): reads RANK,
    WORLD_SIZE (else SLURM_PROCID, SLURM_NTASKS), MASTER_ADDR and MASTER_PORT (default 29500).
    Every collective then fails after `timeout_s` instead of hanging. Returns (rank, world)."""
    env = os.environ
    rank = env.get("RANK", env.get("SLURM_PROCID"))
    world = env.get("WORLD_SIZE", env.get("SLURM_NTASKS"))
    for name, value in (
        ("RANK (or SLURM_PROCID)", rank),
        ("WORLD_SIZE (or SLURM_NTASKS)", world),
        ("MASTER_ADDR", env.get("MASTER_ADDR")),
    ):
        if value is None:
            raise ValueError(f"environment variable {name} is not set: start ranks with a launcher")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        torch.cuda.set_device(local)
    dist.init_process_group(
        backend, rank=int(rank), world_size=int(world), timeout=timedelta(seconds=timeout_s)
    )
    return int(rank), int(world)


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    backend: str,
    init_method: str,
    timeout_s: float,
    threads: int,
    results: Any,
    args: tuple,
) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        out = fn(rank, world_size, *args)
        results.put((rank, pickle.dumps(out)))
    finally:
        dist.destroy_process_group()


def _failures(job: mp.ProcessContext, first: ProcessException) -> str:
    """Every failed rank's traceback (from torch's per-rank error files), first seen first."""
    texts = []
    for rank in sorted(range(len(job.processes)), key=lambda r: r != first.error_index):
        try:
            with open(job.error_files[rank], "rb") as fh:
                texts.append(f"rank {rank} failed:\n{pickle.load(fh)}")
        except (OSError, EOFError, pickle.UnpicklingError):
            if rank == first.error_index:
                texts.append(f"rank {rank} died: {first}")
    return "\n".join(texts)


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads: int = 1,
    collective_timeout_s: float | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined in one group.

    The group meets through a file store in a temporary directory (no port to pick on a
    shared machine). Every collective times out after `collective_timeout_s` (default
    `timeout_s`), raising in its rank, and the whole job is ended after `timeout_s`. A rank that
    raises ends the job at once (the others are terminated) with `RankFailed` carrying every
    failed rank's traceback; a rank that hangs ends it at the deadline.
    `fn` must be importable (a module-level function); its return values (picklable) come back
    in rank order.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
    for name, value in (("timeout_s", timeout_s), ("collective_timeout_s", collective_timeout_s)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value} must be a positive number of seconds")
    collective_timeout_s = collective_timeout_s or timeout_s
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    out: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ep_store_") as tmp:
        init_method = f"file://{tmp}/store"
        rank_args = (fn, world_size, backend, init_method, collective_timeout_s, threads, results)
        job = mp.start_processes(
            _rank_main,
            args=(*rank_args, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                while not results.empty():  # drain so no rank blocks on a full pipe
                    rank, blob = results.get()
                    out[rank] = pickle.loads(blob)
                if job.join(timeout=0.2):
                    break
                if time.monotonic() > deadline:
                    raise RankFailed(f"the {world_size}-rank job ran past timeout_s={timeout_s}")
        except ProcessException as e:
            # the first rank seen failing may only be a peer of the rank that raised (its
            # collective broke when that rank exited): report every failed rank's traceback
            raise RankFailed(_failures(job, e)) from None
        finally:
            for p in job.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
                    if p.is_alive():
                        p.kill()
        while not results.empty():
            rank, blob = results.get()
            out[rank] = pickle.loads(blob)
    return [out.get(r) for r in range(world_size)]
