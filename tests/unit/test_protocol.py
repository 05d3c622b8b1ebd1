"""Every message survives encode/decode unchanged."""
from __future__ import annotations

import pytest

from common.protocol import (
    MESSAGE_TYPES,
    AgentFailed,
    AgentReady,
    InitAgent,
    Shutdown,
    StepRequest,
    StepResult,
    decode,
    encode,
    logits_file_name,
)

EXAMPLES = [
    InitAgent("llmserve_1_in_ab", "llmserve_1_out_cd", 2048, 64, 128, 4096, 20, 16),
    AgentReady(rank=0, pid=42, vocab_size=1024, num_layers=4, num_kv_blocks=512, block_size=16, dtype="float32", device="cpu"),
    StepRequest(step_id=7, num_tokens=19, num_seqs=3, num_sample=2, block_table_width=5, is_all_greedy=False),
    StepRequest(7, 19, 3, 2, 5, True, dump_names=["req-a_00000.npy", "req-b_00012.npy"]),
    StepResult(step_id=7, rank=0, timings_ms={"predict": 3.5, "sample": 0.25}, error=None),
    StepResult(step_id=8, rank=0, timings_ms={}, error="Traceback: boom", received_at=12.5, replied_at=12.75),
    Shutdown(),
    AgentFailed(rank=1, reason="no safetensors in /x"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trips(message):
    assert decode(encode(message)) == message


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


def test_logits_file_names_are_safe_and_sort_by_position():
    assert logits_file_name("req-1", 0) == "req-1_00000.npy"
    assert logits_file_name("../a b/c", 42) == ".._a_b_c_00042.npy"
    assert sorted(logits_file_name("r", p) for p in (10, 2, 1)) == ["r_00001.npy", "r_00002.npy", "r_00010.npy"]


def test_unknown_tag_is_rejected():
    import msgpack

    with pytest.raises(ValueError, match="unknown message tag"):
        decode(msgpack.packb([99]))
