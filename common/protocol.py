"""Every message between the master and its agents, with its encoding.

Messages are dataclasses packed with msgpack as `[version, tag, field0, field1, ...]`;
`decode` checks the version, dispatches on the tag and checks every field's type,
so bytes that are not a message of this version raise ProtocolError and nothing
else. Bulk arrays never travel here: they sit in the shared-memory layout of
common/shm.py, and a StepRequest says how much of each array this step uses.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import msgpack

PROTOCOL_VERSION = 2  # 1 had no version field; bump on any change to a message


class ProtocolError(ValueError):
    """Bytes that are not a well-formed message of this protocol version."""


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
    timings_ms: dict[str, float] = field(default_factory=dict)
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


def is_safe_file_name(name: str) -> bool:
    """A name `logits_file_name` could have made: no path separators, not `.` or `..`."""
    return name not in (".", "..") and 0 < len(name) <= 255 and not UNSAFE_FILE_CHARS.search(name)


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
    return msgpack.packb([PROTOCOL_VERSION, message.TAG, *values], use_bin_type=True)


def decode(data: bytes) -> Message:
    """Unpack bytes made by `encode`; raise ProtocolError for anything else."""
    try:
        unpacked = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises ExtraData, FormatError, StackError, ValueError, ... on bad bytes
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__})") from None
    if not isinstance(unpacked, list) or len(unpacked) < 2:
        raise ProtocolError("not a message: expected [version, tag, fields...]")
    version, tag, *values = unpacked
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}; this side speaks version {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(tag) if _is_int(tag) else None
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag!r}")
    fields = _field_types(cls)
    num_required = sum(1 for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING)
    if not num_required <= len(values) <= len(fields):
        raise ProtocolError(f"{cls.__name__} with {len(values)} fields")
    for (name, hint), value in zip(fields, values):
        if not _fits(value, hint):
            raise ProtocolError(f"{cls.__name__}.{name}: {type(value).__name__} does not fit {hint}")
    return cls(*values)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _fits(value: Any, hint: Any) -> bool:
    """`value` (as msgpack unpacks it) has the annotated type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_int(value) or isinstance(value, float)
    return isinstance(value, hint)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
