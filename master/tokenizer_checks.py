"""Start-up checks that the tokenizer fits the model (vocabulary, end tokens); each message names both sides."""
from __future__ import annotations

import os
from typing import Optional

from tokenizers import Tokenizer

from llmserve.common.config import ModelConfig
from llmserve.common.errors import ConfigError
from llmserve.common.model_info import ModelInfo, checkpoint_eos_token_ids
from llmserve.master.tokenizer import tokenizer_file

# Models pad their embedding past the tokenizer (to a multiple of 64 or 128, or by a few spare rows),
# so a tokenizer smaller by this much is normal; some reserve more rows (DeepSeek LLM 7B: 2.3%), which
# is worth a warning; a tokenizer covering less than MIN_SHARE of the model's ids is another model's.
PADDING_MULTIPLE = 128
PADDING_SHARE = 0.01
MIN_SHARE = 0.9


def check_tokenizer(tokenizer: Tokenizer, model_config: ModelConfig, hf_config: dict, info: ModelInfo) -> list[str]:
    """Warnings to log at start; raise ConfigError where the tokenizer cannot serve this model."""
    sides = _Sides(tokenizer, model_config)
    warnings = [_check_vocab_size(sides, info.vocab_size, model_config.tokenizer_path is not None)]
    _check_end_tokens_exist(sides, info.eos_token_ids, model_config.end_token_id is not None)
    if model_config.end_token_id is not None:
        warnings.append(_check_explicit_end_tokens(sides, model_config, hf_config))
    return [warning for warning in warnings if warning]


def num_token_ids(tokenizer: Tokenizer) -> int:
    """How many ids the tokenizer can produce: its largest id + 1, added tokens included."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


class _Sides:
    """How a message names the tokenizer and the model."""

    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.num_ids = num_token_ids(tokenizer)
        self.tokenizer_name = f"the tokenizer ({tokenizer_file(model_config)}, {self.num_ids} token ids)"
        if model_config.dummy_config is not None:
            self.model_name = "model_config.dummy_config"
        else:
            self.model_name = os.path.join(model_config.model_path, "config.json")
        self.eos_name = f"eos_token_id of {self.model_name}"
        if model_config.model_path is not None:
            self.eos_name += " or generation_config.json"


def _check_vocab_size(sides: _Sides, vocab_size: int, is_explicit: bool) -> Optional[str]:
    both = f"{sides.tokenizer_name} and the model's vocab_size {vocab_size} ({sides.model_name})"
    if sides.num_ids > vocab_size:
        raise ConfigError(
            f"{both} do not fit: the model has no embedding for ids {vocab_size}..{sides.num_ids - 1}; "
            "set model_config.tokenizer_path to the model's tokenizer"
        )
    if _is_padding(sides.num_ids, vocab_size):
        return None
    if sides.num_ids >= MIN_SHARE * vocab_size:
        return f"{both}: the model's last {vocab_size - sides.num_ids} ids have no text (fine if it keeps them unused)"
    problem = (
        f"{both} do not match: {vocab_size - sides.num_ids} of the model's tokens have no text, "
        "so generated text comes out garbled or empty"
    )
    if not is_explicit:
        raise ConfigError(
            f"{problem}; set model_config.tokenizer_path to the model's tokenizer (naming a tokenizer there "
            "serves it anyway, with a warning)"
        )
    return f"model_config.tokenizer_path: {problem}"


def _is_padding(num_ids: int, vocab_size: int) -> bool:
    rounded_up = -(-num_ids // PADDING_MULTIPLE) * PADDING_MULTIPLE
    return vocab_size - num_ids <= PADDING_SHARE * vocab_size or vocab_size <= rounded_up


def _check_end_tokens_exist(sides: _Sides, eos_token_ids: tuple[int, ...], is_explicit: bool) -> None:
    where = "model_config.end_token_id" if is_explicit else sides.eos_name
    for token_id in eos_token_ids:
        if sides.tokenizer.id_to_token(token_id) is None:
            raise ConfigError(f"end token id {token_id} ({where}) is not in {sides.tokenizer_name}")


def _check_explicit_end_tokens(sides: _Sides, model_config: ModelConfig, hf_config: dict) -> Optional[str]:
    checkpoint = checkpoint_eos_token_ids(model_config, hf_config)
    if not checkpoint or set(model_config.end_token_id) <= set(checkpoint):
        return None
    explicit = _named(sides, model_config.end_token_id)
    return (
        f"model_config.end_token_id {explicit} is not among the model's end tokens {_named(sides, checkpoint)} "
        f"({sides.eos_name}): generation stops only at {explicit}"
    )


def _named(sides: _Sides, token_ids) -> str:
    return "[" + ", ".join(f"{token_id} {sides.tokenizer.id_to_token(token_id)!r}" for token_id in token_ids) + "]"
