"""Text <-> token ids for the master: Hugging Face `tokenizers`, plus incremental detokenization."""
from __future__ import annotations

import functools
import os
import re
from typing import Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from common.config import ModelConfig
from common.errors import ConfigError

BUILTIN = "builtin"
BUILTIN_VOCAB_SIZE = 1024
BUILTIN_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: unk, bos, eos
CORPUS_PATH = os.path.join(os.path.dirname(__file__), "data", "tokenizer_corpus.txt")


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
    """The tokenizer named by the config: builtin, or tokenizer.json of a directory."""
    path = model_config.tokenizer_path or model_config.model_path
    if path == BUILTIN:
        return build_builtin_tokenizer()
    if path is None:
        raise ConfigError("model_config.tokenizer_path: set it to a directory with tokenizer.json, or to 'builtin'")
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"model_config.tokenizer_path: no tokenizer.json in {path}")
    return Tokenizer.from_file(file)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters."""

    CONTEXT_TOKENS = 5  # earlier tokens decoded alongside, so leading spaces come out right

    def __init__(self, tokenizer: Tokenizer, prompt_len: int):
        self.tokenizer = tokenizer
        self.prefix_offset = max(prompt_len - self.CONTEXT_TOKENS, 0)
        self.read_offset = prompt_len

    def step(self, token_ids: list[int]) -> str:
        """Text added by the tokens after the last call (may be empty while a character is incomplete)."""
        decode = self.tokenizer.decode
        prefix_text = decode(token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full_text = decode(token_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full_text[len(prefix_text) :]


def decode(tokenizer: Tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; a rendered chat template already holds its special tokens (add_special_tokens=False)."""
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


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


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
