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
from typing import Any, Callable, ClassVar, Optional

import msgpack

PROTOCOL_VERSION = 11  # 1 had no version field; bump on any change to a message


class ProtocolError(ValueError):
    """Bytes that are not a well-formed message of this protocol version."""


@dataclass
class InitAgent:
    """Master -> agent: attach to these shared-memory segments (a pair of step buffers each way; none when the
    arrays travel inline) and report ready."""

    TAG: ClassVar[int] = 1
    input_shms: list[str]
    output_shms: list[str]
    max_num_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int
    history_capacity: int
    topk_width: int
    suppress_width: int
    max_num_rows: int
    draft_width: int
    mask_width: int = 0


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
    kv_cache_bytes: int = 0  # what its num_kv_blocks take on this rank
    kernels: dict[str, str] = field(default_factory=dict)  # what computes what: {"attention": "cpu (...)", ...}


@dataclass
class StepRequest:
    """Master -> agent: run one step over the first rows of the input arrays."""

    TAG: ClassVar[int] = 3
    step_id: int
    num_tokens: int
    num_seqs: int
    num_sample: int
    num_new_blocks: int  # block ids in new_block_ids: the block-table deltas of the step's sequences
    is_all_greedy: bool
    num_block_copies: int = 0
    dump_names: Optional[list[str]] = None  # one file name per sampled row, only when logits are dumped
    num_prompt_positions: int = 0  # tokens whose next prompt token is scored (prompt log-probabilities)
    prompt_num_top: int = 0  # top log-probabilities returned per scored position
    released_seq_ids: list[int] = field(default_factory=list)  # sequences whose block tables the agent drops first
    draft_width: int = 0  # speculative draft model: the most tokens proposed per sequence (draft_ids' row width)
    buffer: int = 0  # which pair of step buffers holds this step's arrays (steps in flight together alternate)
    # overlapped scheduling: the step it was planned after, or -1. Its input and history tokens -1 - r stand for
    # row r of that step's sampled ids, which the agent fills in (that step must be the last one it ran, and ran well)
    follows_step: int = -1
    num_new_params: int = 0  # sequences new to the agents, whose sampling parameters the step carries
    num_history_ids: int = 0  # token ids in history_ids: the history deltas of the step's sequences
    # structured output: the sampled rows whose allowed tokens token_masks holds (in this order), mask_width
    # 32-bit words each (bit i of word w allows token 32 w + i)
    masked_rows: list[int] = field(default_factory=list)
    mask_width: int = 0
    # the masks come after the step, in a StepMasks message to rank 0, once the tokens they follow are known (a
    # step planned while the one before ran); token_masks is then unused
    masks_follow: bool = False


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
class StepMasks:
    """Master -> agent rank 0: the token masks of a step sent with masks_follow, once the tokens of the step
    before are in (the agent runs the step's forward meanwhile, and waits for them only to sample). `masks`:
    the rows' int32 words, in masked_rows order."""

    TAG: ClassVar[int] = 7
    step_id: int
    masks: bytes


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

MESSAGE_TYPES = {
    cls.TAG: cls for cls in (InitAgent, AgentReady, StepRequest, StepResult, Shutdown, AgentFailed, StepMasks)
}

Message = InitAgent | AgentReady | StepRequest | StepResult | Shutdown | AgentFailed | StepMasks


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
    cls = MESSAGE_TYPES.get(tag) if type(tag) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag!r}")
    num_required, fields = _field_checks(cls)
    if not num_required <= len(values) <= len(fields):
        raise ProtocolError(f"{cls.__name__} with {len(values)} fields")
    for (name, fits), value in zip(fields, values):
        if not fits(value):
            raise ProtocolError(f"{cls.__name__}.{name}: {type(value).__name__} does not fit its type")
    return cls(*values)


@functools.lru_cache(maxsize=None)
def _field_checks(cls: type) -> tuple[int, list[tuple[str, Callable[[Any], bool]]]]:
    """How many fields a message of `cls` needs at least, and each field's name and type check."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    num_required = sum(1 for f in fields if f.default is f.default_factory is dataclasses.MISSING)
    return num_required, [(f.name, _check_of(hints[f.name])) for f in fields]


def _check_of(hint: Any) -> Callable[[Any], bool]:
    """A test that a value, as msgpack unpacks it (exact built-in types), has the annotated type; made once per field."""
    simple = _simple_types(hint)
    if simple is not None:
        return lambda value: type(value) in simple
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_check_of(option) for option in args]
        return lambda value: any(fits(value) for fits in options)
    if origin is list:
        item = _check_of(args[0])
        return lambda value: type(value) is list and all(map(item, value))
    if origin is dict:
        key, item = _check_of(args[0]), _check_of(args[1])
        return lambda value: type(value) is dict and all(key(k) and item(v) for k, v in value.items())
    raise TypeError(f"no check for {hint}")


SIMPLE_TYPES = {
    int: (int,), float: (int, float), str: (str,), bool: (bool,), bytes: (bytes,), type(None): (type(None),),
}


def _simple_types(hint: Any) -> Optional[tuple[type, ...]]:
    """The exact types a plain annotation (or a union of plain ones) admits; None for containers."""
    if hint in SIMPLE_TYPES:
        return SIMPLE_TYPES[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [SIMPLE_TYPES.get(option) for option in typing.get_args(hint)]
        if all(parts):
            return tuple(t for part in parts for t in part)
    return None
