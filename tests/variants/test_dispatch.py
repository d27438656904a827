"""`variants.dispatch.expert_order`: the stable sort by expert, padded to torch's radix size.

Outputs and gradients of every dispatch path are checked against `loop` in test_backends.py.
"""

from __future__ import annotations

import pytest
import torch

from variants.dispatch import RADIX_SORT_MIN, expert_order


@pytest.mark.parametrize("num_experts", [4, 64, 255, 300])
@pytest.mark.parametrize("A", [0, 1, 37, 5000, RADIX_SORT_MIN - 1, RADIX_SORT_MIN, 40000])
def test_expert_order_is_the_stable_argsort(num_experts: int, A: int) -> None:
    g = torch.Generator().manual_seed(A)
    expert_A = torch.randint(0, num_experts, (A,), generator=g)
    got = expert_order(expert_A, num_experts)
    assert torch.equal(got, torch.argsort(expert_A, stable=True))
