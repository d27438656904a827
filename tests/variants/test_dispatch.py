"""`variants.compute.dispatch`: `expert_order` (the stable sort by expert, padded to torch's
radix size) and the padded layout (each bmm group padded to its own largest load).

Outputs and gradients of every dispatch path are checked against `loop` in test_backends.py.
"""

from __future__ import annotations

import pytest
import torch

from variants.compute.assignments import make_routing
from variants.compute.backends import dispatch_layout
from variants.compute.dispatch import RADIX_SORT_MIN, expert_order, padded_groups
from variants.compute.experts import ExpertBank


@pytest.mark.parametrize("num_experts", [4, 64, 255, 300])
@pytest.mark.parametrize("A", [0, 1, 37, 5000, RADIX_SORT_MIN - 1, RADIX_SORT_MIN, 40000])
def test_expert_order_is_the_stable_argsort(num_experts: int, A: int) -> None:
    g = torch.Generator().manual_seed(A)
    expert_A = torch.randint(0, num_experts, (A,), generator=g)
    got = expert_order(expert_A, num_experts)
    assert torch.equal(got, torch.argsort(expert_A, stable=True))


@pytest.mark.parametrize(
    ("counts", "group_rows", "groups"),
    [
        # G = 12 // 3 = 4 experts a group, each group padded to its own largest load
        ([3, 1, 0, 2, 0, 0, 1, 1], 12, [(0, 4, 3), (4, 8, 1)]),
        ([2, 2, 2], 4, [(0, 2, 2), (2, 3, 2)]),
        ([0, 0, 5, 0], 4, [(0, 1, 0), (1, 2, 0), (2, 3, 5), (3, 4, 0)]),  # G >= 1
        ([0, 0], 8, [(0, 2, 0)]),
    ],
)
def test_padded_groups(
    counts: list[int], group_rows: int, groups: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("variants.compute.dispatch.GROUP_ROWS", group_rows)
    assert padded_groups(counts) == groups


def test_padded_layout_rows_tokens_and_zero_weight_pads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("variants.compute.dispatch.GROUP_ROWS", 6)  # largest load 3: groups of 2
    # tokens 0..4; expert loads [3, 1, 0, 2]
    token_A = torch.tensor([0, 1, 2, 3, 4, 4])
    expert_A = torch.tensor([0, 0, 1, 3, 0, 3])
    weight_A = torch.arange(1.0, 7.0)
    scores_TE = torch.zeros(5, 4)
    routing = make_routing(token_A, expert_A, weight_A, scores_TE, scores_TE, torch.zeros(4))
    rows, weight_R = dispatch_layout(routing, weight_A, ExpertBank(4, 2, 2, "gelu"), "padded_bmm")
    # group [0, 2) pads to 3 rows an expert, group [2, 4) to 2: 6 + 4 rows, not 4 * 3
    assert rows.groups == ((0, 2, 0, 6), (2, 4, 6, 10))
    assert rows.token_R.tolist() == [0, 1, 4, 2, 0, 0, 0, 0, 3, 4]
    assert weight_R.tolist() == [1.0, 2.0, 5.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0, 6.0]
