"""Every message survives encode/decode unchanged."""
from __future__ import annotations

import msgpack
import pytest

from llmserve.common.protocol import (
    MESSAGE_TYPES,
    AgentFailed,
    AgentReady,
    InitAgent,
    Shutdown,
    StepMasks,
    StepRequest,
    StepResult,
    PROTOCOL_VERSION,
    ProtocolError,
    decode,
    encode,
    is_safe_file_name,
    logits_file_name,
)

EXAMPLES = [
    InitAgent(["llmserve_1_in_ab", "llmserve_1_in_ef"], ["llmserve_1_out_cd", "llmserve_1_out_gh"], 2048, 64, 128, 4096, 20, 16, 320, 4),
    AgentReady(rank=0, pid=42, vocab_size=1024, num_layers=4, num_kv_blocks=512, block_size=16, dtype="float32", device="cpu"),
    StepRequest(step_id=7, num_tokens=19, num_seqs=3, num_sample=2, num_new_blocks=5, is_all_greedy=False,
                released_seq_ids=[4, 9], buffer=1, follows_step=6),
    StepRequest(7, 19, 3, 2, 5, True, dump_names=["req-a_00000.npy", "req-b_00012.npy"]),
    StepResult(step_id=7, rank=0, timings_ms={"predict": 3.5, "sample": 0.25}, error=None),
    StepResult(step_id=8, rank=0, timings_ms={}, error="Traceback: boom", received_at=12.5, replied_at=12.75),
    Shutdown(),
    AgentFailed(rank=1, reason="no safetensors in /x"),
    StepMasks(step_id=9, masks=bytes(range(16))),
    StepRequest(9, 4, 2, 2, 0, False, follows_step=8, masked_rows=[0, 1], mask_width=32, masks_follow=True),
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


NOT_MESSAGES = {
    "empty": b"",
    "not msgpack": b"\xc1",
    "truncated": encode(StepRequest(1, 1, 1, 1, 1, True))[:-2],
    "extra data": encode(Shutdown()) + b"\x00",
    "a map": msgpack.packb({"tag": 3}),
    "the unversioned protocol": msgpack.packb([3, 1, 1, 1, 1, 1, True]),
    "another version": msgpack.packb([PROTOCOL_VERSION + 1, Shutdown.TAG]),
    "unknown tag": msgpack.packb([PROTOCOL_VERSION, 99]),
    "a string tag": msgpack.packb([PROTOCOL_VERSION, "3"]),
    "too few fields": msgpack.packb([PROTOCOL_VERSION, StepRequest.TAG, 1, 2]),
    "too many fields": msgpack.packb([PROTOCOL_VERSION, Shutdown.TAG, 1]),
    "a string for an int": msgpack.packb([PROTOCOL_VERSION, StepRequest.TAG, "1", 1, 1, 1, 1, True]),
    "a bool for an int": msgpack.packb([PROTOCOL_VERSION, StepRequest.TAG, True, 1, 1, 1, 1, True]),
    "ints for names": msgpack.packb([PROTOCOL_VERSION, StepRequest.TAG, 1, 1, 1, 1, 1, True, 0, [1, 2]]),
    "a list for timings": msgpack.packb([PROTOCOL_VERSION, StepResult.TAG, 1, 0, [1.0]]),
    "text for mask bytes": msgpack.packb([PROTOCOL_VERSION, StepMasks.TAG, 1, "\x00\x01"]),
    "deeply nested": b"\x91" * 100_000 + b"\x00",
}


@pytest.mark.parametrize("data", NOT_MESSAGES.values(), ids=NOT_MESSAGES.keys())
def test_bytes_that_are_not_a_message_raise_protocol_error_only(data):
    with pytest.raises(ProtocolError):
        decode(data)


def test_ints_are_accepted_where_floats_are_declared():
    data = msgpack.packb([PROTOCOL_VERSION, StepResult.TAG, 1, 0, {"predict": 3}, None, 5, 6])
    assert decode(data) == StepResult(1, 0, {"predict": 3}, None, 5, 6)


def test_safe_file_names_have_no_path():
    assert is_safe_file_name(logits_file_name("../../etc/passwd", 3))
    assert not any(map(is_safe_file_name, ["../x.npy", "a/b.npy", "..", ".", "", "x" * 300]))
