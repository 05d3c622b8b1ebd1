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
)

EXAMPLES = [
    InitAgent("llmserve_1_in_ab", "llmserve_1_out_cd", 2048, 64, 128),
    AgentReady(rank=0, pid=42, vocab_size=1024, num_layers=4, num_kv_blocks=512, block_size=16, dtype="float32", device="cpu"),
    StepRequest(step_id=7, num_tokens=19, num_seqs=3, num_sample=2, block_table_width=5, is_all_greedy=False),
    StepResult(step_id=7, rank=0, timings_ms={"predict": 3.5, "sample": 0.25}, error=None),
    StepResult(step_id=8, rank=0, timings_ms={}, error="Traceback: boom"),
    Shutdown(),
    AgentFailed(rank=1, reason="no safetensors in /x"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trips(message):
    assert decode(encode(message)) == message


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES.values())


def test_unknown_tag_is_rejected():
    import msgpack

    with pytest.raises(ValueError, match="unknown message tag"):
        decode(msgpack.packb([99]))
