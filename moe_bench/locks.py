"""Advisory locks on sweep and job folders (docs/contract.md §7), so two runs never write one job.

A lock is `fcntl.flock` on a `.lock` file in the folder, taken without waiting. The kernel drops
it when its holder dies, even by SIGKILL, so a free lock with a `running` state file means the
job was killed: no PID guessing, and a recycled PID cannot pass for a live job. The holder
writes who it is (PID, host, since when) into the lock file, so the loser can say who holds it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK = ".lock"


class Busy(Exception):
    """The lock is held by another open file: the message says by whom."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def holder(folder: Path) -> str:
    """Who holds (or last held) folder's lock, as words: 'PID 12 on host h since ...'."""
    try:
        info = json.loads((folder / LOCK).read_text())
        return f"PID {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


class Lock:
    """An exclusive, non-blocking lock on folder/.lock; `release()` or process exit frees it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.fd: int | None = None

    def acquire(self) -> Lock:
        """Take the lock or raise Busy naming its holder; OSError if the folder is not writable."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"{self.folder} is in use by {holder(self.folder)}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_held(folder: str | Path) -> bool:
    """True when some process holds folder's lock now (probing takes and drops it at once)."""
    path = Path(folder) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody ever locked it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
