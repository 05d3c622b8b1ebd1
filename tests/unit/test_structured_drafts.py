"""Speculative decoding under a constraint: what a constrained sequence verifies, and each row's mask."""
from __future__ import annotations

import numpy as np

from llmserve.common.sampling import StructuredOutput
from llmserve.master.structured import GrammarCompiler, constrained_drafts, fill_draft_masks, fill_mask, mask_width
from llmserve.master.tokenizer import build_builtin_tokenizer, decode, encode

TOKENIZER = build_builtin_tokenizer()
VOCAB = TOKENIZER.get_vocab_size()
EOS = [2]
COMPILER = GrammarCompiler(TOKENIZER.to_str(), VOCAB, EOS)


def matcher(kind: str, value: str):
    return COMPILER.compile(StructuredOutput(kind, value)).deep_copy()


def ids(text: str) -> list[int]:
    return encode(TOKENIZER, text, add_special_tokens=False)


def test_tokens_the_grammar_forces_come_first_and_are_all_allowed():
    forced = matcher("regex", "hello world(!|\\?)")
    drafts = constrained_drafts(forced, ids("nonsense"), 8, EOS)
    assert drafts and "hello world".startswith(decode(TOKENIZER, drafts))  # the speculator's proposal is ignored
    assert len(constrained_drafts(forced, [], 1, EOS)) == 1  # at most `most`


def test_proposals_are_cut_before_the_first_the_grammar_refuses_or_an_end_token():
    free = matcher("regex", "[ab]+")
    a, b, c = ids("a")[0], ids("b")[0], ids("c")[0]
    assert constrained_drafts(free, [a, b, a, c, a], 8, EOS) == [a, b, a]
    assert constrained_drafts(free, [a, EOS[0], a], 8, EOS) == [a]
    assert constrained_drafts(free, [a, b, a], 2, EOS) == [a, b]


def test_each_verification_row_gets_the_mask_after_the_proposals_before_it_and_the_matcher_is_left_as_it_was():
    width = mask_width(VOCAB)
    grammar = matcher("regex", "(ab|ac)d")
    drafts = ids("a")[:1] + ids("b")[:1]
    rows = np.zeros(3 * width, np.int32)
    fill_draft_masks(grammar, drafts, rows, width, EOS)
    expected = np.zeros(3 * width, np.int32)
    step = matcher("regex", "(ab|ac)d")
    for row in range(3):
        fill_mask(step, expected[row * width : (row + 1) * width], EOS)
        if row < len(drafts):
            step.consume_token(drafts[row])
    assert np.array_equal(rows, expected)
    assert not np.array_equal(rows[:width], rows[width : 2 * width])
    again = np.zeros(width, np.int32)
    fill_mask(grammar, again, EOS)
    assert np.array_equal(again, rows[:width])  # rolled back
