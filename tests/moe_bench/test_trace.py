import numpy as np
import pytest

from moe_bench.trace import load_trace, save_trace


def small_trace() -> tuple[dict, dict]:
    # two steps of 3 tokens, one layer, top-2 of 4 experts: token t of step s picks (t, t+1) % 4
    step, token, expert, weight = [], [], [], []
    for s in (0, 5):
        for t in range(3):
            for k in range(2):
                step.append(s)
                token.append(t)
                expert.append((t + k + s) % 4)
                weight.append(0.5 + 0.1 * k)
    n = len(step)
    arrays = {
        "step_N": step,
        "layer_N": [1] * n,
        "token_N": token,
        "expert_N": expert,
        "weight_N": weight,
        "tok_step_M": [0, 0, 0, 5, 5, 5],
        "tok_index_M": [0, 1, 2, 0, 1, 2],
        "tok_domain_M": [0, 1, 1, 2, 2, 0],
        "tok_id_M": [10, 11, 12, 13, 14, 15],
    }
    return {k: np.asarray(v) for k, v in arrays.items()}, {
        "num_experts": 4,
        "top_k": 2,
        "tokens_per_step": 3,
    }


def test_a_trace_round_trips_and_one_step_reads_back(tmp_path):
    arrays, meta = small_trace()
    save_trace(tmp_path / "trace.npz", arrays, meta)
    trace = load_trace(tmp_path)
    assert trace.steps == [0, 5] and trace.layers == [1]
    one = trace.routing_of(5, 1)
    assert one["token_A"].tolist() == [0, 0, 1, 1, 2, 2]
    assert one["expert_A"].tolist() == [1, 2, 2, 3, 3, 0]
    np.testing.assert_allclose(one["weight_A"], [0.5, 0.6] * 3, rtol=1e-6)
    assert one["domain_T"].tolist() == [2, 2, 0] and one["id_T"].tolist() == [13, 14, 15]
    with pytest.raises(ValueError, match="step=1, layer=1 is not in the trace"):
        trace.routing_of(1, 1)


def test_a_broken_trace_names_what_is_wrong(tmp_path):
    arrays, meta = small_trace()
    arrays["expert_N"][0] = 4
    with pytest.raises(ValueError, match=r"expert_N holds 0\.\.4; allowed 0\.\.3"):
        save_trace(tmp_path / "t.npz", arrays, meta)
    arrays, meta = small_trace()
    del meta["top_k"]
    with pytest.raises(ValueError, match="trace meta lacks 'top_k'"):
        save_trace(tmp_path / "t.npz", arrays, meta)
    arrays, meta = small_trace()
    arrays["weight_N"] = arrays["weight_N"][:-1]
    with pytest.raises(ValueError, match="differ in length"):
        save_trace(tmp_path / "t.npz", arrays, meta)
    assert not list(tmp_path.iterdir())
