"""Text <-> token ids for the master: Hugging Face `tokenizers`, plus incremental detokenization."""
from __future__ import annotations

import functools
import os
import re
from typing import Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmserve.common.config import ModelConfig
from llmserve.common.errors import ConfigError
from llmserve.master.sentencepiece_conversion import converted_tokenizer

BUILTIN = "builtin"
BUILTIN_VOCAB_SIZE = 1024
BUILTIN_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: unk, bos, eos
CORPUS_PATH = os.path.join(os.path.dirname(__file__), "data", "tokenizer_corpus.txt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # in a directory, in this order of preference
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's piece for one byte of an unknown character


def build_builtin_tokenizer(vocab_size: int = BUILTIN_VOCAB_SIZE) -> Tokenizer:
    """Train the embedded model's byte-level BPE tokenizer on the shipped corpus (deterministic, ~20 ms)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BUILTIN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train([CORPUS_PATH], trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the tokenizer corpus yields {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def load_tokenizer(model_config: ModelConfig) -> Tokenizer:
    """The tokenizer `tokenizer_file` names: builtin, a tokenizer.json, or a sentencepiece model converted once."""
    file = tokenizer_file(model_config)
    if file == BUILTIN:
        return build_builtin_tokenizer()
    if file.endswith(".json"):
        try:
            return Tokenizer.from_file(file)
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot read
            raise ConfigError(f"{file}: not a tokenizer.json of Hugging Face tokenizers: {exc}") from exc
    return converted_tokenizer(file)


def tokenizer_file(model_config: ModelConfig) -> str:
    """Where the tokenizer comes from: `tokenizer_path` if set, else the checkpoint's, else builtin (dummy weights).

    BUILTIN, or a file: tokenizer.json, else a sentencepiece tokenizer.model, of the directory named.
    """
    if model_config.tokenizer_path is not None:
        return _tokenizer_file_in(model_config.tokenizer_path, "model_config.tokenizer_path")
    if model_config.model_path is not None:
        return _tokenizer_file_in(model_config.model_path, "model_config.model_path")
    return BUILTIN


def _tokenizer_file_in(path: str, key: str) -> str:
    if path == BUILTIN or os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} does not exist")
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ConfigError(
        f"{key}: {path} has neither tokenizer.json nor tokenizer.model; "
        "set model_config.tokenizer_path to a tokenizer's directory or file, or to 'builtin'"
    )


CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, so its first token reads as it does after the prompt


def output_text(tokenizer: Tokenizer, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> str:
    """The text a sequence's output adds to its prompt, read with the prompt's last tokens as context.

    Decoding the output alone would drop the leading space of its first token with a sentencepiece
    (Metaspace) tokenizer; this text is what decoding prompt + output adds to decoding the prompt.
    Every way of reading a generation (streamed or not, stop strings, beams) gives this text.
    """
    context = list(prompt_ids[-CONTEXT_TOKENS:])
    return _text_after(tokenizer, context + list(output_ids), 0, len(context))


def output_texts(tokenizer: Tokenizer, prompt_ids: Sequence[int], outputs: Sequence[Sequence[int]]) -> list[str]:
    """`output_text` of several outputs of one prompt."""
    return [output_text(tokenizer, prompt_ids, output_ids) for output_ids in outputs]


def _text_after(tokenizer: Tokenizer, token_ids: Sequence[int], start: int, end: int) -> str:
    """The text token_ids[end:] add after token_ids[start:end] (both decoded from `start`)."""
    context = decode(tokenizer, token_ids[start:end])
    return decode(tokenizer, token_ids[start:])[len(context) :]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that add up to `output_text`.

    Each step decodes the newest tokens after the ones decoded last time. Text that may still
    change is held back until a later token settles it, or the sequence ends: an incomplete
    character, and a run of byte-fallback tokens (`<0xE5>`), which sentencepiece decodes as a
    whole, so one more byte can turn a character already complete into replacement characters.
    """

    def __init__(self, tokenizer: Tokenizer, num_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.prefix_offset = max(num_prompt_tokens - CONTEXT_TOKENS, 0)
        self.read_offset = num_prompt_tokens

    def step(self, token_ids: Sequence[int], is_last: bool = False) -> str:
        """Text added by the tokens after the last call; with `is_last` (the sequence's end), all of it."""
        text = _text_after(self.tokenizer, token_ids, self.prefix_offset, self.read_offset)
        if not text or (not is_last and (text.endswith("\ufffd") or self._is_byte(token_ids[-1]))):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return text

    def _is_byte(self, token_id: int) -> bool:
        return BYTE_FALLBACK.fullmatch(self.tokenizer.id_to_token(token_id) or "") is not None


def decode(tokenizer: Tokenizer, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; a rendered chat template already holds its special tokens (add_special_tokens=False).

    `encode_batch` of one text, because `encode` holds the GIL all along (0.4 s for 500k characters, with the
    event loop stalled), while `encode_batch` lets other threads run.
    """
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for, even when they are only part of a UTF-8 character."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    if isinstance(tokenizer.decoder, decoders.ByteLevel):
        table = _byte_level_table()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    byte = BYTE_FALLBACK.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode()  # sentencepiece's word marker is a space


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's scheme)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def special_token_id(tokenizer: Tokenizer, token: str) -> Optional[int]:
    return tokenizer.token_to_id(token)
