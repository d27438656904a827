"""scripts/speed_floor.py: its arithmetic on hand-made samples, its round order, and the FLOPs
of every form of every part (the same work in every form; dense's GEMMs are dense's own)."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from scripts.speed_floor import cumulative, parts, timed_rounds
from scripts.speed_table import SIZES


def test_cumulative_takes_each_rounds_fastest_form_over_that_rounds_dense() -> None:
    ms = {"gemms": {"x": [5.0, 10.0, 6.0], "y": [4.0, 12.0, 5.0]}, "moves": {"": [1.0, 2.0, 1.0]}}
    rows = cumulative(ms, dense_ms=[10.0, 20.0, 10.0])
    # fastest per round: 4, 10, 5 -> 0.4, 0.5, 0.5; plus moves: 5, 12, 6 -> 0.5, 0.6, 0.6
    assert [(part, medians) for part, medians, _ in rows] == [
        ("gemms", {"x": 6.0, "y": 5.0}),
        ("moves", {"": 1.0}),
    ]
    assert rows[0][2] == pytest.approx((0.45, 0.5, 0.5))
    assert rows[1][2] == pytest.approx((0.55, 0.6, 0.6))


def test_timed_rounds_warms_up_then_rotates_the_order_each_round() -> None:
    calls: list[str] = []
    steps = {"p": {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}}
    steps["q"] = {"": lambda: calls.append("c")}
    ms = timed_rounds(steps, rounds=4)
    assert calls == list("abc" + "abc" + "bca" + "cab" + "abc")
    assert {form: len(s) for forms in ms.values() for form, s in forms.items()} == {
        "a": 4,
        "b": 4,
        "": 4,
    }


def flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def test_every_form_of_a_part_does_the_same_gemm_flops_as_the_layer_needs() -> None:
    T, D, E, K, H, S, _ = SIZES["quick"]
    steps = parts("quick")
    # forward+backward of a SwiGLU FFN: 9 GEMMs of 2*rows*D*width FLOPs each
    expected = {
        "routed GEMMs": 9 * 2 * T * K * D * H,
        "router and shared GEMMs": 3 * 2 * T * D * E + 9 * 2 * T * D * S * H,
        "dense GEMMs": flops(steps["dense"][""]),  # the dense layer's own step
    }
    assert expected["dense GEMMs"] == 9 * 2 * T * D * (K + S) * H
    for part, want in expected.items():
        for form, step in steps[part].items():
            assert flops(step) == want, (part, form)
    for part in ("gathers and scatters [A, D]", "softmax, top-K, sort"):
        for step in steps[part].values():
            assert flops(step) == 0
