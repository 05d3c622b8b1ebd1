"""tools/bench_overlap.py's summary of paired rounds."""
from __future__ import annotations

from llmserve.tools.bench_overlap import summarize


def mode(decode_ms: float, outputs: list, step_ms: float = 4.0, forward_ms: float = 3.0) -> dict:
    return {"decode_ms": decode_ms, "step_ms": step_ms, "forward_ms": forward_ms, "overlapped": 1.0,
            "stages_ms": {"agent sample": 0.1}, "outputs": outputs}


def test_the_speed_up_is_the_median_of_each_rounds_off_over_on_and_outputs_must_all_agree():
    rounds = [{"on": mode(2.0, [[1]]), "off": mode(3.0, [[1]])},
              {"on": mode(4.0, [[1]]), "off": mode(4.0, [[1]])},
              {"on": mode(1.0, [[1]]), "off": mode(2.0, [[1]])}]
    summary = summarize(rounds)
    assert summary["speedups"] == [1.5, 1.0, 2.0] and summary["speedup"] == 1.5
    assert summary["on"]["decode_ms"] == 2.0 and summary["on"]["outside_forward_share"] == 0.25
    assert summary["on"]["stages_ms"] == {"agent sample": 0.1} and summary["outputs_equal"]
    rounds[1]["off"]["outputs"] = [[2]]
    assert not summarize(rounds)["outputs_equal"]
