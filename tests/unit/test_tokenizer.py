"""The builtin tokenizer and incremental detokenization."""
from __future__ import annotations

import pytest

from llmserve.master.tokenizer import (
    BUILTIN_VOCAB_SIZE, IncrementalDetokenizer, build_builtin_tokenizer, decode, encode, output_text,
)
from tests.sentencepiece_tokenizer import sentencepiece_tokenizer


def test_builtin_tokenizer_is_deterministic_and_round_trips_any_text():
    first, second = build_builtin_tokenizer(), build_builtin_tokenizer()
    assert first.get_vocab_size() == BUILTIN_VOCAB_SIZE
    text = "I love Beijing, because 北京 has über-good 🍜!"
    ids = encode(first, text)
    assert ids == encode(second, text)
    assert ids[0] == 1  # <s>
    assert decode(first, ids) == text


def test_output_text_keeps_the_leading_space_that_decoding_prompt_and_output_together_gives():
    for decoder in ("llama", "metaspace"):
        tokenizer = sentencepiece_tokenizer(decoder)
        prompt = encode(tokenizer, "The cat sat on")
        output = encode(tokenizer, "The cat sat on the mat")[len(prompt) :]
        assert tokenizer.id_to_token(output[0]).startswith("\u2581")
        assert decode(tokenizer, output) == "the mat"  # alone, the first token loses its space
        text = output_text(tokenizer, prompt, output)
        assert text == " the mat"
        assert decode(tokenizer, prompt + output) == decode(tokenizer, prompt) + text


def stream(tokenizer, prompt: list[int], output: list[int]) -> list[str]:
    """The deltas of an incremental detokenizer fed one token at a time, the last one as the end of the sequence."""
    detokenizer = IncrementalDetokenizer(tokenizer, len(prompt))
    ids = list(prompt)
    pieces = []
    for i, token in enumerate(output):
        ids.append(token)
        pieces.append(detokenizer.step(ids, is_last=i == len(output) - 1))
    return pieces


TOKENIZERS = [build_builtin_tokenizer(), sentencepiece_tokenizer()]
TOKENIZER_NAMES = ["byte-level", "sentencepiece"]


@pytest.mark.parametrize("tokenizer", TOKENIZERS, ids=TOKENIZER_NAMES)
def test_streamed_deltas_add_up_to_the_output_text(tokenizer):
    prompt = encode(tokenizer, "Hello")
    output = encode(tokenizer, "Hello wörld 北京 🍜 and more text", add_special_tokens=False)[len(prompt) - 1 :]
    pieces = stream(tokenizer, prompt, output)
    assert "".join(pieces) == output_text(tokenizer, prompt, output) == " wörld 北京 🍜 and more text"
    assert "" in pieces  # characters spanning several tokens are held back until complete


@pytest.mark.parametrize("tokenizer", TOKENIZERS, ids=TOKENIZER_NAMES)
def test_a_sequence_ending_inside_a_character_streams_what_the_output_text_says(tokenizer):
    prompt = encode(tokenizer, "Hello")
    ids = encode(tokenizer, "Hello 🍜🍜 and", add_special_tokens=False)[len(prompt) - 1 :]
    # Cut inside the second emoji: sentencepiece then decodes both emojis' bytes as replacement characters.
    output = next(ids[:end] for end in range(len(ids), 0, -1) if decode(tokenizer, ids[:end]).endswith("\ufffd"))
    pieces = stream(tokenizer, prompt, output)
    text = output_text(tokenizer, prompt, output)
    assert text.endswith("\ufffd") and "".join(pieces) == text
    assert decode(tokenizer, prompt + output) == decode(tokenizer, prompt) + text
