"""Every message between the master and its agents, with its encoding.

Messages are dataclasses packed with msgpack as `[tag, field0, field1, ...]`;
`decode` dispatches on the tag. Bulk arrays never travel here: they sit in the
shared-memory layout of common/shm.py, and a StepRequest says how much of each
array this step uses.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import msgpack


@dataclass
class InitAgent:
    """Master -> agent: attach to these shared-memory segments and report ready."""

    TAG: ClassVar[int] = 1
    input_shm: str
    output_shm: str
    max_num_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int
    history_capacity: int
    topk_width: int
    suppress_width: int


@dataclass
class AgentReady:
    """Agent -> master: the model is loaded and these are the facts found."""

    TAG: ClassVar[int] = 2
    rank: int
    pid: int
    vocab_size: int
    num_layers: int
    num_kv_blocks: int
    block_size: int
    dtype: str
    device: str


@dataclass
class StepRequest:
    """Master -> agent: run one step over the first rows of the input arrays."""

    TAG: ClassVar[int] = 3
    step_id: int
    num_tokens: int
    num_seqs: int
    num_sample: int
    block_table_width: int
    is_all_greedy: bool
    num_block_copies: int = 0
    dump_names: Optional[list[str]] = None  # one file name per sampled row, only when logits are dumped


@dataclass
class StepResult:
    """Agent -> master: the step ran (tokens are in the output arrays) or failed."""

    TAG: ClassVar[int] = 4
    step_id: int
    rank: int
    timings_ms: dict = field(default_factory=dict)
    error: Optional[str] = None
    # time.perf_counter() when the agent got the request and when it replied; on one host the
    # master's clock is the same (CLOCK_MONOTONIC), which splits the round trip into out and back.
    received_at: float = 0.0
    replied_at: float = 0.0


@dataclass
class Shutdown:
    """Master -> agent: exit now."""

    TAG: ClassVar[int] = 5


@dataclass
class AgentFailed:
    """Agent -> master: start-up failed; `reason` says why."""

    TAG: ClassVar[int] = 6
    rank: int
    reason: str


UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
MAX_REQUEST_ID_CHARS = 200


def logits_file_name(request_id: str, position: int) -> str:
    """Name of the `.npy` file holding the logits that chose generated token `position` of a request."""
    stem = UNSAFE_FILE_CHARS.sub("_", request_id)[:MAX_REQUEST_ID_CHARS]
    return f"{stem}_{position:05d}.npy"


EXIT_BAD_PORT = 3
EXIT_LOAD_FAILED = 4
EXIT_MASTER_GONE = 5
AGENT_EXIT_REASONS = {
    EXIT_BAD_PORT: "it could not listen on its port",
    EXIT_LOAD_FAILED: "it could not load the model",
    EXIT_MASTER_GONE: "its master went away",
}

MESSAGE_TYPES = {cls.TAG: cls for cls in (InitAgent, AgentReady, StepRequest, StepResult, Shutdown, AgentFailed)}

Message = InitAgent | AgentReady | StepRequest | StepResult | Shutdown | AgentFailed


def encode(message: Message) -> bytes:
    """Pack a message into bytes."""
    values = [getattr(message, f.name) for f in dataclasses.fields(message)]
    return msgpack.packb([message.TAG, *values], use_bin_type=True)


def decode(data: bytes) -> Message:
    """Unpack bytes made by `encode`."""
    tag, *values = msgpack.unpackb(data, raw=False, strict_map_key=False)
    try:
        cls = MESSAGE_TYPES[tag]
    except KeyError:
        raise ValueError(f"unknown message tag {tag}") from None
    return cls(*values)
