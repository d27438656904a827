"""The CPU dispatch layout of `grouped` (variants/dispatch.py) on hand-checkable inputs.

Outputs and gradients of every layout are checked against `loop` in test_backends.py; here the
planning itself: the chunking rule, the row layout and the sort.
"""

from __future__ import annotations

import pytest
import torch

from variants import dispatch
from variants.dispatch import (
    PADDED_BMM,
    PER_EXPERT,
    Chunk,
    ExpertRows,
    blocks,
    plan_chunks,
    sort_by_expert,
)

# loads of 5 experts: sorted largest first (ties by id) they are 2, 3, 0, 4; expert 1 is empty
COUNTS = [5, 0, 7, 7, 1]
ROW_BYTES = 4


def test_per_expert_gives_one_unpadded_chunk_per_busy_expert() -> None:
    chunks = plan_chunks(COUNTS, ROW_BYTES, row_flops=1, path=PER_EXPERT)
    assert chunks == [Chunk((2,), 7, 0), Chunk((3,), 7, 7), Chunk((0,), 5, 14), Chunk((4,), 1, 19)]


def test_padded_fills_chunks_up_to_the_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "CHUNK_BYTES", 3 * 7 * ROW_BYTES)  # 3 experts of 7 rows
    chunks = plan_chunks(COUNTS, ROW_BYTES, row_flops=1, path=PADDED_BMM)
    # experts 2, 3, 0 padded to 7 rows each (expert 0 gets 2 pad rows), then expert 4 alone
    assert chunks == [Chunk((0, 2, 3), 7, 0), Chunk((4,), 1, 21)]
    assert chunks[0].stop == 21 and chunks[0].span is None
    assert Chunk((2, 3), 7, 0).span == (2, 4)


@pytest.mark.parametrize(
    ("pad_row_seconds", "expected"),
    [
        # a pad row costs more than a chunk: only equal loads share one (no padding)
        (1.0, [Chunk((2, 3), 7, 0), Chunk((0,), 5, 14), Chunk((4,), 1, 19)]),
        # a pad row is free: one chunk as far as the budget goes
        (0.0, [Chunk((0, 2, 3, 4), 7, 0)]),
    ],
)
def test_the_cost_rule_pads_only_when_cheaper_than_a_chunk(
    monkeypatch: pytest.MonkeyPatch, pad_row_seconds: float, expected: list[Chunk]
) -> None:
    monkeypatch.setattr(dispatch, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(dispatch, "FLOP_SECONDS", pad_row_seconds)
    assert plan_chunks(COUNTS, ROW_BYTES, row_flops=1) == expected


def test_unknown_path_is_refused_in_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"path='bmm' is not one of \('per_expert', 'padded_bmm'\)"
    ):
        plan_chunks(COUNTS, ROW_BYTES, row_flops=1, path="bmm")


def test_rows_put_each_assignment_in_its_experts_block_and_pad_with_token_0() -> None:
    # experts sorted (stable) with their tokens and weights: expert 0 has tokens 4, 6;
    # expert 2 has token 1; chunk (0, 2) padded to 2 rows each
    expert_A = torch.tensor([0, 0, 2])
    token_A = torch.tensor([4, 6, 1])
    weight_A = torch.tensor([0.5, 0.25, 1.0])
    chunks = [Chunk((0, 2), 2, 0)]
    rows, weight_R = ExpertRows.build(expert_A, token_A, weight_A, chunks, 3, num_tokens=8)
    assert rows.token_R.tolist() == [4, 6, 1, 0]
    assert weight_R.tolist() == [0.5, 0.25, 1.0, 0.0]
    assert rows.path == PADDED_BMM and rows.indices[0].tolist() == [0, 2]
    one = ExpertRows.build(
        expert_A, token_A, weight_A, [Chunk((0,), 2, 0), Chunk((2,), 1, 2)], 3, 8
    )
    assert one[0].path == PER_EXPERT and one[0].token_R.tolist() == [4, 6, 1]


@pytest.mark.parametrize("num_experts", [4, 64, 300])
@pytest.mark.parametrize("A", [0, 1, 37, (1 << 15) - 1, 1 << 15, 40000])
def test_sort_by_expert_is_the_stable_argsort(num_experts: int, A: int) -> None:
    g = torch.Generator().manual_seed(A)
    expert_A = torch.randint(0, num_experts, (A,), generator=g)
    got = sort_by_expert(expert_A, num_experts)
    assert torch.equal(got, torch.argsort(expert_A, stable=True))


def test_blocks_join_consecutive_chunks_within_both_budgets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunks = (Chunk((2,), 7, 0), Chunk((3,), 7, 7), Chunk((0,), 5, 14), Chunk((4,), 1, 19))
    monkeypatch.setattr(dispatch, "BLOCK_BYTES", 14 * ROW_BYTES)  # 14 of the 20 rows
    monkeypatch.setattr(dispatch, "BLOCK_FRACTION", 1)
    assert blocks(chunks, ROW_BYTES) == [(0, 2), (2, 4)]
    # a fraction of all rows bounds it too: 20 // 3 = 6 rows, so one chunk of 7 per block,
    # then 5 + 1 rows
    monkeypatch.setattr(dispatch, "BLOCK_FRACTION", 3)
    assert blocks(chunks, ROW_BYTES) == [(0, 1), (1, 2), (2, 4)]
