"""The builtin tokenizer and incremental detokenization."""
from __future__ import annotations

from master.tokenizer import BUILTIN_VOCAB_SIZE, IncrementalDetokenizer, build_builtin_tokenizer, decode, encode


def test_builtin_tokenizer_is_deterministic_and_round_trips_any_text():
    first, second = build_builtin_tokenizer(), build_builtin_tokenizer()
    assert first.get_vocab_size() == BUILTIN_VOCAB_SIZE
    text = "I love Beijing, because 北京 has über-good 🍜!"
    ids = encode(first, text)
    assert ids == encode(second, text)
    assert ids[0] == 1  # <s>
    assert decode(first, ids) == text


def test_incremental_deltas_add_up_to_the_full_decode():
    tokenizer = build_builtin_tokenizer()
    prompt = encode(tokenizer, "Hello")
    output = encode(tokenizer, " wörld 🍜 and more text")[1:]
    detok = IncrementalDetokenizer(tokenizer, len(prompt))
    ids, pieces = list(prompt), []
    for token in output:
        ids.append(token)
        pieces.append(detok.step(ids))
    assert "".join(pieces) == decode(tokenizer, output)
    assert "" in pieces  # the emoji spans several byte tokens and is held back until complete
