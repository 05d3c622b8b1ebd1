"""The stage profiler's arithmetic on a hand-made trace."""
from __future__ import annotations

import json

import pytest

from llmserve.tools.profile_steps import breakdown, main, split

TRACE = [
    {"num_seqs": 2, "num_prefill_seqs": 2, "num_sampled": 2, "step_ms": 10.0,
     "master_ms": {"schedule": 0.5, "ipc": 0.5}, "agent_ms": {"predict": 8.0, "sample": 0.5}},
    {"num_seqs": 2, "num_prefill_seqs": 0, "num_sampled": 2, "step_ms": 4.0,
     "master_ms": {"schedule": 0.1, "ipc": 0.4}, "agent_ms": {"predict": 3.0, "sample": 0.2}},
    {"num_seqs": 4, "num_prefill_seqs": 0, "num_sampled": 4, "step_ms": 6.0,
     "master_ms": {"schedule": 0.2, "ipc": 0.6}, "agent_ms": {"predict": 5.0, "sample": 0.1}},
]


def test_decode_steps_are_separated_from_prefill_steps():
    parts = split(TRACE)
    assert len(parts["prefill"]) == 1 and len(parts["decode"]) == 2


def test_overhead_is_the_share_of_wall_time_outside_the_forward():
    decode = breakdown(split(TRACE)["decode"])
    assert decode.step_ms == 10.0 and decode.forward_ms == 8.0
    assert decode.overhead == pytest.approx(0.2)
    assert decode.num_tokens_generated == 6
    assert decode.stage_ms["master ipc"] == pytest.approx(1.0)
    assert decode.unaccounted_ms == pytest.approx(10.0 - (0.3 + 1.0 + 8.0 + 0.3))


def test_report_prints_per_step_and_per_token_columns(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    decode_part = out[out.index("decode:"):]
    assert "2 steps, 6 tokens generated" in decode_part
    assert "agent predict" in decode_part and "4.000" in decode_part  # 8 ms over 2 steps
    assert "serving overhead (step - forward) / step: 20.0%" in decode_part


def test_the_profile_verb_prints_the_same_report(tmp_path, capsys):
    from llmserve.cli import main as llmserve

    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    assert main([str(path)]) == 0
    report = capsys.readouterr().out
    assert llmserve(["profile", str(path)]) == 0
    assert capsys.readouterr().out == report
