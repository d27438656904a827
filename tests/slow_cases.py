"""A parametrised test's cases split between the two runs: most in the default run, those named
slow only in the slow run (`-m slow`), so that each case runs in exactly one of them. A case
added later (a new variant) runs in the default run until it is named slow."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import pytest


def some_slow(cases: Iterable[Any], slow: Collection[Any]) -> list[Any]:
    """`cases` (values, or tuples of values for several argnames) with those in `slow` marked
    slow; every entry of `slow` must be one of `cases` (a renamed case is not dropped)."""
    cases = list(cases)
    unknown = [c for c in slow if c not in cases]
    if unknown:
        raise ValueError(f"slow={unknown!r} are not among the cases")
    return [
        pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
        if c in slow
        else c
        for c in cases
    ]
