"""Tokenizer and chat-template work on a thread of its own, so a big prompt never stalls the event loop.

The tokenizer's Rust code runs without the GIL, so `/health` and other
requests keep being answered while a prompt of the largest allowed body is
encoded. Before any of that, a prompt longer than any `max_seq_len` tokens of
this tokenizer can cover is refused by its length alone.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, TypeVar

from tokenizers import Tokenizer

from llmserve.common.errors import RequestError
from llmserve.master.tokenizer import decode, encode

T = TypeVar("T")

# Normalizers and pre-tokenizers that never drop characters; with another (Strip, Whitespace, ...) a long
# text may still make few tokens, and the length check is skipped.
KEEPS_CHARACTERS = {"Sequence", "ByteLevel", "Metaspace", "Digits", "Punctuation", "Prepend", "Lowercase",
                    "NFC", "NFD", "NFKC", "NFKD", "Split", "Replace"}
NORMALIZED_CHARS_PER_CHAR = 4  # NFC/NFKC compose a character and its marks (Hangul jamo: 3 into 1)
PROBE_CHARS_PER_TOKEN = 4  # English averages about 4 characters per token with a 32k vocabulary


class TextWorker:
    """Encodes, decodes and renders chat templates on a worker thread; refuses prompts that cannot fit."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_chars = max_prompt_chars(tokenizer, max_seq_len)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llmserve-text")

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; RequestError naming `field` when it cannot fit or is not valid Unicode.

        A text longer than PROBE_CHARS_PER_TOKEN characters per token of the context is first counted
        on a prefix of that length: a prompt far too long then costs only that prefix (the tokenizer
        holds the GIL while it hands over and frees each token, ~0.3 us apiece).
        """
        if self.max_chars is not None and len(text) > self.max_chars:
            raise RequestError(
                f"{field}: {len(text)} characters cannot fit the model's {self.max_seq_len} tokens "
                f"(no token of this tokenizer covers more than {self.max_chars // self.max_seq_len} characters)", field,
            )
        probe_chars = self.max_seq_len * PROBE_CHARS_PER_TOKEN
        if len(text) > probe_chars:
            num_tokens = len(await self.run(encode_checked, self.tokenizer, text[:probe_chars], field, False))
            if num_tokens > self.max_seq_len + 1:  # the prefix's last token may differ from the whole text's
                raise RequestError(
                    f"{field}: its first {probe_chars} characters alone are {num_tokens} tokens, more than the "
                    f"model's maximum of {self.max_seq_len}", field,
                )
        return await self.run(encode_checked, self.tokenizer, text, field, add_special_tokens)

    async def decode(self, token_ids: Sequence[int]) -> str:
        return await self.run(decode, self.tokenizer, token_ids)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def encode_checked(tokenizer: Tokenizer, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
    """`encode`, with a RequestError naming `field` for text the tokenizer cannot take (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{field}: not valid Unicode text: {exc.object[exc.start]!r} at character {exc.start} is half of a "
            "UTF-16 surrogate pair", field,
        ) from None
    ids = encode(tokenizer, text, add_special_tokens)
    if len(text) >= TRIM_AFTER_CHARS:
        _give_back_memory()
    return ids


TRIM_AFTER_CHARS = 1 << 18


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _give_back_memory() -> None:
    """The tokenizer's buffers for a big text are freed into this thread's malloc arena, which glibc keeps
    (~100 MB after a 4 MiB prompt); hand the free pages back to the system."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def max_prompt_chars(tokenizer: Tokenizer, max_seq_len: int) -> Optional[int]:
    """The most characters `max_seq_len` tokens can stand for; None when the tokenizer may drop characters."""
    state = json.loads(tokenizer.to_str())
    if not all(_keeps_characters(state.get(part)) for part in ("normalizer", "pre_tokenizer")):
        return None
    model = state.get("model") or {}
    if (model.get("type") == "Unigram" or model.get("fuse_unk")) and not model.get("byte_fallback"):
        return None  # a run of unknown characters of any length may become one unknown token
    pieces = [*tokenizer.get_vocab(with_added_tokens=True)]
    longest = max((len(piece) for piece in pieces), default=1)
    return max_seq_len * longest * NORMALIZED_CHARS_PER_CHAR


def _keeps_characters(component: Optional[dict]) -> bool:
    """A normalizer or pre-tokenizer (as tokenizer.json holds it) that never drops input characters."""
    if component is None:
        return True
    kind = component.get("type")
    if kind not in KEEPS_CHARACTERS:
        return False
    if kind == "Split" and str(component.get("behavior", "")).lower() == "removed":
        return False
    if kind == "Replace":  # keeps the length only when it puts at least as much text as it takes
        pattern = (component.get("pattern") or {}).get("String")
        return pattern is not None and len(component.get("content") or "") >= len(pattern)
    parts = component.get("normalizers") or component.get("pretokenizers") or []
    return all(_keeps_characters(part) for part in parts)
