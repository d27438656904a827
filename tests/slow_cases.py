"""A parametrised test's cases split between the two runs: a representative few in the default
run, the rest in the slow run (`-m slow`), so that each case runs in exactly one of them."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import pytest


def rest_slow(cases: Iterable[Any], default: Collection[Any]) -> list[Any]:
    """`cases` (values, or tuples of values for several argnames) with those not in `default`
    marked slow; every entry of `default` must be one of `cases`."""
    cases = list(cases)
    unknown = [c for c in default if c not in cases]
    if unknown:
        raise ValueError(f"default={unknown!r} are not among the cases")
    return [
        c
        if c in default
        else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
        for c in cases
    ]
