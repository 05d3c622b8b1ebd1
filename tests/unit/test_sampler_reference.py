"""The sampler against transformers' logits processors, in batches whose rows each ask for different settings.

Every reference is computed here, row by row, with the transformers processor for that row's value (skipped where
the value means "off"), in the order `generate` applies them; the sampler must give the same masks and values for
the whole batch at once, draw tokens with the frequencies of the filtered distribution, and keep seeded rows
independent of the rest of the batch.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

import llmserve.agent.sampler as sampler_module
from llmserve.agent.sampler import Sampler, apply_penalties, filter_logits, suppress_tokens
from llmserve.common.sampling import SamplingParams
from tests.sampling_rows import make_rows

DEVICE = torch.device(os.environ.get("LLMSERVE_TEST_DEVICE", "cpu"))  # LLMSERVE_TEST_DEVICE=cuda on a GPU machine
VOCAB = 48
P_VALUE = 0.001


def sampled(**overrides) -> SamplingParams:
    return SamplingParams(do_sample=True, **overrides)


def random_logits(num_rows: int, seed: int, vocab: int = VOCAB, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(num_rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def run_sampler(logits: torch.Tensor, params: Sequence[SamplingParams], seed: int = 0, **rows):
    batch, is_all_greedy = make_rows(params, **rows)
    return Sampler(DEVICE, seed=seed)(logits.clone().to(DEVICE), batch, is_all_greedy)


def hf_warpers(params: SamplingParams) -> list:
    """The warpers `generate` would build for these params, in its order (temperature, top-k, top-p, min-p, typical)."""
    warpers = []
    if params.agent_temperature not in (0.0, 1.0):
        warpers.append(TemperatureLogitsWarper(float(params.agent_temperature)))
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    if params.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(params.typical_p))
    return warpers


def per_row(scores: torch.Tensor, processors_per_row: Sequence[list], histories: Optional[Sequence] = None):
    """Apply each row's own processors to that row alone, as transformers would for a batch of one."""
    out = []
    for i, processors in enumerate(processors_per_row):
        row = scores[i : i + 1].clone()
        input_ids = torch.tensor([histories[i]]) if histories else torch.zeros(1, 1, dtype=torch.long)
        for processor in processors:
            row = processor(input_ids, row)
        out.append(row)
    return torch.cat(out)


def assert_same_distribution(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same -inf mask exactly, same finite values up to float rounding."""
    got = got.cpu()
    differs = (torch.isneginf(got) != torch.isneginf(expected)).any(-1)
    assert not differs.any(), f"masked differently in rows {differs.nonzero().flatten().tolist()}"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)


def temperatures(rows) -> torch.Tensor:
    temperature = torch.from_numpy(rows.temperature.copy())
    return torch.where(temperature == 0, 1.0, temperature).unsqueeze(1)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square over the tokens with non-zero probability (no scipy needed)."""
    support = probs > 0
    expected = probs[support].double() * counts.sum()
    statistic = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


# 1. Each transform, with a different value on every row, against its transformers processor.


def test_temperature_divides_each_sampled_row_by_its_own_value_before_filtering(monkeypatch):
    seen = []

    def recording_filter(logits, rows):
        seen.append((logits.cpu().clone(), rows.temperature.copy()))
        return filter_logits(logits, rows)

    monkeypatch.setattr(sampler_module, "filter_logits", recording_filter)
    params = [sampled(temperature=t) for t in (0.5, 1.0, 1.7, 0.05)] + [SamplingParams(), sampled(temperature=3.0)]
    logits = random_logits(len(params), seed=1)
    run_sampler(logits, params)
    expected = per_row(logits, [hf_warpers(p) for p in params])
    [(scaled, temperature)] = seen
    row_of = {np.float32(p.temperature): i for i, p in enumerate(params) if not p.is_greedy}  # distinct values
    filtered = [j for j in range(len(temperature)) if temperature[j] > 0]  # greedy rows, if filtered, don't matter
    assert sorted(row_of[temperature[j]] for j in filtered) == sorted(row_of.values())
    assert_same_distribution(scaled[filtered], expected[[row_of[temperature[j]] for j in filtered]])


@pytest.mark.parametrize(
    "name, values",
    [
        ("top_k", (0, 1, 3, 10, VOCAB, VOCAB + 5)),
        ("top_p", (1.0, 0.9, 0.5, 0.05, 0.99, 0.3)),
        ("min_p", (0.0, 0.05, 0.1, 0.3, 0.7, 1.0)),
        ("typical_p", (1.0, 0.2, 0.5, 0.9, 0.95, 0.05)),
    ],
)
def test_each_warper_matches_transformers_with_a_different_value_per_row(name, values):
    params = [sampled(**{name: v}) for v in values]
    rows, _ = make_rows(params)
    logits = random_logits(len(params), seed=2)
    expected = per_row(logits, [hf_warpers(p) for p in params])
    assert_same_distribution(filter_logits(logits.clone().to(DEVICE), rows), expected)


def test_top_k_keeps_tokens_tied_with_the_kth_like_transformers():
    params = [sampled(top_k=k) for k in (2, 4, 5, 0)]
    rows, _ = make_rows(params)
    logits = (random_logits(len(params), seed=3) * 2).round() / 2  # many ties
    expected = per_row(logits, [hf_warpers(p) for p in params])
    assert_same_distribution(filter_logits(logits.clone().to(DEVICE), rows), expected)


@pytest.mark.parametrize("scale", [6.0, 0.3])  # peaked: a few hundred tokens hold the mass; flat: they do not
def test_top_p_matches_transformers_over_a_large_vocabulary(scale):
    params = [sampled(top_p=p) for p in (0.9, 1.0, 0.5, 0.99, 0.2)]
    rows, _ = make_rows(params)
    logits = random_logits(len(params), seed=17, vocab=2000, scale=scale)
    expected = per_row(logits, [hf_warpers(p) for p in params])
    assert_same_distribution(filter_logits(logits.clone().to(DEVICE), rows), expected)


@pytest.mark.parametrize("vocab", [17, 2000])
def test_top_p_with_ties_at_the_cut_keeps_the_same_values_as_transformers(vocab):
    """Which of two equal logits survives is torch.sort's (unstable) choice in transformers; the kept mass is not."""
    params = [sampled(top_p=p) for p in (0.05, 0.1, 0.3, 0.6, 0.9)]
    rows, _ = make_rows(params)
    logits = random_logits(len(params), seed=18, vocab=vocab).round()  # many ties, among them the best tokens
    expected = per_row(logits, [hf_warpers(p) for p in params])
    got = filter_logits(logits.clone().to(DEVICE), rows).cpu()
    for row in range(len(params)):
        assert torch.equal(got[row][torch.isfinite(got[row])].sort().values,
                           expected[row][torch.isfinite(expected[row])].sort().values), f"row {row}"


def test_chained_warpers_match_transformers_in_generate_order():
    params = [
        sampled(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95),
        sampled(temperature=1.3, top_k=8, top_p=0.6),
        sampled(temperature=0.5, top_p=0.8, min_p=0.2),
        sampled(temperature=2.0, min_p=0.1, typical_p=0.7),
        sampled(top_k=30, typical_p=0.5),
        sampled(temperature=0.9),
        SamplingParams(top_p=0.5),  # greedy: filtered all the same, then its argmax taken
    ]
    rows, _ = make_rows(params)
    logits = random_logits(len(params), seed=4)
    expected = per_row(logits, [hf_warpers(p) for p in params])
    got = filter_logits((logits / temperatures(rows)).to(DEVICE), rows)
    assert_same_distribution(got, expected)


def test_repetition_penalty_matches_transformers_over_prompt_and_output():
    penalties = (1.0, 1.2, 0.8, 2.0, 1.5, 1.3)
    params = [sampled(repetition_penalty=p) for p in penalties[:-1]] + [SamplingParams(repetition_penalty=1.3)]
    histories = [[1, 2], [3, 4, 5, 3, 9], [0, 7, 7, 12, 40], [10, 11, 12, 13], [47, 1, 2, 3, 4, 5, 6, 47], [8, 9]]
    prompt_lens = [1, 2, 5, 1, 3, 2]
    rows, _ = make_rows(params, histories=histories, prompt_lens=prompt_lens)
    logits = random_logits(len(params), seed=5)
    reference = [[RepetitionPenaltyLogitsProcessor(p)] if p != 1 else [] for p in penalties]
    expected = per_row(logits, reference, histories)
    assert_same_distribution(apply_penalties(logits.clone().to(DEVICE), rows), expected)


def test_no_repeat_ngram_matches_transformers_with_a_different_n_per_row():
    sizes = (0, 2, 3, 2, 3, 1, 4)
    histories = [
        [1, 2, 1, 2, 1],
        [5, 6, 7, 5, 6, 8, 5],  # 2-grams (5, 6) and (5, 8) seen: both 6 and 8 banned after 5
        [5, 6, 7, 5, 6, 8, 5, 6],  # 3-grams after (5, 6): 7 and 8
        [3, 3, 3, 4, 3],  # (3, 3) and (3, 4) seen
        [9, 10],  # too short for a 3-gram
        [20, 21, 22, 20],
        [1, 2, 3, 9, 1, 2, 3, 10, 4, 1, 2, 3],  # (1, 2, 3) followed by 9 and 10
    ]
    params = [sampled(no_repeat_ngram_size=n) for n in sizes]
    rows, _ = make_rows(params, histories=histories, prompt_lens=[2] * len(params))
    logits = random_logits(len(params), seed=6)
    expected = per_row(logits, [[NoRepeatNGramLogitsProcessor(n)] if n else [] for n in sizes], histories)
    assert torch.isneginf(expected).sum() > 8  # the histories do ban tokens
    assert_same_distribution(apply_penalties(logits.clone().to(DEVICE), rows), expected)


def openai_penalties(logits: torch.Tensor, params, histories, prompt_lens) -> torch.Tensor:
    """logits - frequency * count_in_output - presence * (count_in_output > 0), per row."""
    out = logits.clone()
    for i, (p, history, prompt_len) in enumerate(zip(params, histories, prompt_lens)):
        counts = torch.bincount(torch.tensor(history[prompt_len:], dtype=torch.long), minlength=logits.shape[1]).float()
        out[i] = logits[i] - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return out


def test_presence_and_frequency_penalties_follow_the_openai_formula_over_output_only():
    params = [
        sampled(presence_penalty=0.5),
        sampled(frequency_penalty=0.7),
        sampled(presence_penalty=1.5, frequency_penalty=-0.5),
        sampled(presence_penalty=-1.0, frequency_penalty=2.0),
        SamplingParams(),
        SamplingParams(frequency_penalty=1.0),
    ]
    histories = [[4, 4, 5, 6, 6, 6], [4, 4, 5, 6, 6, 6], [1, 2, 2, 2, 3], [9, 9, 9, 1], [5, 5], [30, 31, 30, 30]]
    prompt_lens = [2, 3, 1, 2, 1, 4]  # prompt tokens are not counted; the last row has no output yet
    rows, _ = make_rows(params, histories=histories, prompt_lens=prompt_lens)
    logits = random_logits(len(params), seed=7)
    expected = openai_penalties(logits, params, histories, prompt_lens)
    assert_same_distribution(apply_penalties(logits.clone().to(DEVICE), rows), expected)


# 2. Draw frequencies.


def test_draw_frequencies_match_the_transformers_filtered_distribution():
    vocab, half = 24, 10_000
    first = sampled(temperature=0.8, top_k=12, top_p=0.95, min_p=0.02)
    second = sampled(temperature=1.4, top_p=0.8, min_p=0.1)
    logits = random_logits(1, seed=8, vocab=vocab, scale=1.5)
    ids = run_sampler(logits.repeat(2 * half, 1), [first, second] * half, seed=8).sampled_ids.cpu()
    for offset, params in enumerate((first, second)):
        probs = per_row(logits, [hf_warpers(params)]).softmax(-1)[0]
        counts = torch.bincount(ids[offset::2], minlength=vocab)
        assert counts[probs == 0].sum() == 0, f"{params} drew filtered tokens"
        assert int((probs > 0).sum()) > 4  # a real test of the shape, not of a near-greedy row
        assert chi_square_p_value(counts, probs) > P_VALUE, f"{params}: counts {counts.tolist()} vs {probs.tolist()}"


def test_chi_square_check_rejects_a_wrong_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert chi_square_p_value(torch.tensor([5000, 3000, 2000]), probs) > 0.99
    assert chi_square_p_value(torch.tensor([5200, 2800, 2000]), probs) < P_VALUE


# 3. Seeds.


def seeded_draws(seeds, batch_order, sampler_seed, logits, history_len=3, sample_indexes=None):
    """Ids of the rows in `batch_order`, each with its own seed, history (prompt 1) and a top-k."""
    params = [sampled(seed=seeds[i], top_k=30, temperature=1.5) for i in batch_order]
    histories = [list(range(history_len))] * len(batch_order)
    indexes = [sample_indexes[i] for i in batch_order] if sample_indexes else None
    prompt_lens = [1] * len(params)
    out = run_sampler(logits[batch_order], params, sampler_seed, histories=histories, prompt_lens=prompt_lens,
                      sample_indexes=indexes)
    return dict(zip(batch_order, out.sampled_ids.cpu().tolist()))


def test_a_seeded_row_draws_the_same_token_whatever_else_is_in_the_batch():
    logits = random_logits(6, seed=9, vocab=200, scale=0.5)
    seeds = [11, 22, 33, 44, 55, 66]
    alone = {i: seeded_draws(seeds, [i], 0, logits)[i] for i in range(6)}
    assert seeded_draws(seeds, [5, 3, 1, 0, 2, 4], 123, logits) == alone
    assert len(set(alone.values())) > 3
    others = [sampled(), SamplingParams(repetition_penalty=1.2), sampled(top_p=0.5)]
    crowd = run_sampler(torch.cat([random_logits(3, seed=10, vocab=200), logits[[2]]]),
                        others + [sampled(seed=33, top_k=30, temperature=1.5)], seed=7,
                        histories=[[5, 6, 7], [8, 9], [1], [0, 1, 2]], prompt_lens=[1] * 4)
    assert crowd.sampled_ids[3] == alone[2]


def test_different_seeds_give_different_draws_over_a_few_tokens():
    logits = torch.zeros(4, 1000)
    seeds = [1, 2, 3, 1]
    draws = [seeded_draws(seeds, [0, 1, 2, 3], 0, logits, history_len=n) for n in range(2, 7)]
    sequences = [[step[i] for step in draws] for i in range(4)]
    assert sequences[0] == sequences[3]
    assert len({tuple(s) for s in sequences[:3]}) == 3
    assert len(set(sequences[0])) > 1  # a seed does not pin one token for every position


def test_same_seed_with_different_sample_indexes_draws_differently():
    logits = torch.zeros(4, 1000)
    seeds, indexes = [7, 7, 7, 7], [0, 1, 2, 0]
    draws = [seeded_draws(seeds, [0, 1, 2, 3], 0, logits, history_len=n, sample_indexes=indexes) for n in range(2, 6)]
    sequences = [[step[i] for step in draws] for i in range(4)]
    assert sequences[0] == sequences[3]
    assert len({tuple(s) for s in sequences[:3]}) == 3


# 4. Log-probabilities.


LOGPROB_PARAMS = [
    sampled(logprobs=5, temperature=0.6, top_k=4, seed=1),
    SamplingParams(logprobs=5, repetition_penalty=1.4),
    sampled(logprobs=3, presence_penalty=1.0, frequency_penalty=0.5, top_p=0.7, seed=2),
    sampled(seed=3),  # no logprobs
    SamplingParams(),  # no logprobs, greedy
    sampled(logprobs=0, no_repeat_ngram_size=2, min_p=0.2, seed=4),
]
LOGPROB_HISTORIES = [[1, 2, 3], [1, 2, 3], [4, 4, 5, 6], [0], [0], [7, 8, 7]]


def test_logprobs_are_of_the_raw_logits_whatever_the_row_transforms():
    logits = random_logits(len(LOGPROB_PARAMS), seed=10)
    logits[1, 2] = logits[1].max() + 0.5  # the penalised greedy row picks another token than the raw argmax
    out = run_sampler(logits, LOGPROB_PARAMS, histories=LOGPROB_HISTORIES, prompt_lens=[1] * 6)
    raw = torch.log_softmax(logits, dim=-1)
    ids = out.sampled_ids.cpu()
    assert ids[1] != 2
    for i, params in enumerate(LOGPROB_PARAMS):
        if params.logprobs is None:
            continue
        torch.testing.assert_close(out.sampled_logprobs[i].cpu(), raw[i, ids[i]])
        values, top_ids = raw[i].topk(params.logprobs)
        assert torch.equal(out.topk_ids[i, : params.logprobs].cpu(), top_ids)
        torch.testing.assert_close(out.topk_logprobs[i, : params.logprobs].cpu(), values)


def test_rows_without_logprobs_neither_disturb_nor_are_disturbed_by_rows_with_them():
    logits = random_logits(len(LOGPROB_PARAMS), seed=11)
    together = run_sampler(logits, LOGPROB_PARAMS, histories=LOGPROB_HISTORIES, prompt_lens=[1] * 6)
    with_logprobs, without = [0, 1, 2, 5], [3, 4]
    only_with = run_sampler(logits[with_logprobs], [LOGPROB_PARAMS[i] for i in with_logprobs],
                            histories=[LOGPROB_HISTORIES[i] for i in with_logprobs], prompt_lens=[1] * 4)
    only_without = run_sampler(logits[without], [LOGPROB_PARAMS[i] for i in without], prompt_lens=[1] * 2,
                               histories=[LOGPROB_HISTORIES[i] for i in without])
    assert torch.equal(together.sampled_ids[with_logprobs].cpu(), only_with.sampled_ids.cpu())
    assert torch.equal(together.sampled_logprobs[with_logprobs].cpu(), only_with.sampled_logprobs.cpu())
    assert torch.equal(together.topk_ids[with_logprobs].cpu(), only_with.topk_ids.cpu())
    assert torch.equal(together.sampled_ids[without].cpu(), only_without.sampled_ids.cpu())


# 5. Greedy rows.


def test_greedy_rows_in_a_mixed_batch_take_the_argmax_of_the_penalised_logits():
    params = [sampled(), SamplingParams(repetition_penalty=1.5), sampled(top_k=3),
              SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=2), SamplingParams()]
    histories = [[0], [1, 5, 9], [0], [4, 6, 2, 4], [0]]
    logits = random_logits(len(params), seed=12)
    logits[1, 5] = logits[1].max() + 0.3  # the raw argmax is a repeated token
    logits[3, 6] = logits[3].max() + 5.0  # banned by the 2-gram (4, 6)
    out = run_sampler(logits, params, histories=histories, prompt_lens=[1] * 5)
    reference = [[], [RepetitionPenaltyLogitsProcessor(1.5)], [],
                 [RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2)], []]
    penalised = per_row(logits, reference, histories)
    for i in (1, 3, 4):
        assert out.sampled_ids[i] == penalised[i].argmax()
    assert out.sampled_ids[1] != 5 and out.sampled_ids[3] != 6


def test_an_all_greedy_batch_without_penalties_returns_the_argmax_and_no_logprobs():
    logits = random_logits(5, seed=13)
    out = run_sampler(logits, [SamplingParams(), sampled(temperature=0.0), sampled(top_k=1)] + [SamplingParams()] * 2)
    assert torch.equal(out.sampled_ids.cpu(), logits.argmax(-1))
    assert out.sampled_logprobs is None and out.topk_ids is None and out.topk_logprobs is None


# 6. Beam rows.


def test_beam_rows_return_the_top_candidates_of_the_penalised_log_probabilities():
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(), SamplingParams(no_repeat_ngram_size=2),
              sampled(logprobs=2, seed=5), SamplingParams()]
    histories = [[3, 4, 5, 6], [0], [8, 9, 8], [0], [0]]
    beams = [4, 3, 5, 0, 0]
    logits = random_logits(len(params), seed=14)
    logits[0, [3, 5]] = logits[0].max() + 0.2  # repeated tokens at the top: the penalty reorders the candidates
    logits[2, 9] = logits[2].max() + 1.0  # banned by the 2-gram (8, 9)
    out = run_sampler(logits, params, histories=histories, prompt_lens=[1] * 5, beam_candidates=beams)
    reference = [[RepetitionPenaltyLogitsProcessor(1.3)], [], [NoRepeatNGramLogitsProcessor(2)], [], []]
    processed = per_row(torch.log_softmax(logits, dim=-1), reference, histories)
    for i, k in enumerate(beams[:3]):
        values, ids = processed[i].topk(k)
        assert torch.equal(out.topk_ids[i, :k].cpu(), ids), f"beam row {i}"
        torch.testing.assert_close(out.topk_logprobs[i, :k].cpu(), values)
    raw_values, raw_ids = torch.log_softmax(logits[3], -1).topk(2)  # a non-beam row beside them keeps raw logprobs
    assert torch.equal(out.topk_ids[3, :2].cpu(), raw_ids)
    torch.testing.assert_close(out.topk_logprobs[3, :2].cpu(), raw_values)
    assert out.sampled_ids[4] == logits[4].argmax()


# 7. Suppression.


def test_suppress_tokens_matches_min_new_tokens_per_row_and_leaves_other_rows_alone():
    eos = (0, 7)
    min_new = [3, 3, 0, 5, 1]
    histories = [[1, 2, 3], [1, 2, 3, 4, 5, 6], [1, 2], [9, 9, 9, 9, 9], [4]]
    prompt_lens = [2, 2, 1, 1, 1]
    params = [sampled(min_new_tokens=m) for m in min_new]
    suppress = [eos if len(h) - p < m else () for h, p, m in zip(histories, prompt_lens, min_new)]
    rows, _ = make_rows(params, histories=histories, prompt_lens=prompt_lens, suppress=suppress)
    logits = random_logits(len(params), seed=15)
    reference = [[MinNewTokensLengthLogitsProcessor(p, m, list(eos))] for p, m in zip(prompt_lens, min_new)]
    expected = per_row(logits, reference, histories)
    got = suppress_tokens(logits.clone().to(DEVICE), rows).cpu()
    assert_same_distribution(got, expected)
    untouched = [i for i, s in enumerate(suppress) if not s]
    assert untouched == [1, 2] and torch.equal(got[untouched], logits[untouched])
    other = per_row(logits, [[SuppressTokensLogitsProcessor(s)] if s else [] for s in suppress])
    assert_same_distribution(got, other)


def test_rows_with_suppressed_ids_never_draw_them_and_others_still_do():
    rows_each = 2000
    logits = random_logits(1, seed=16).repeat(2 * rows_each, 1)
    logits[:, [0, 3]] += 8.0  # the suppressed ids would win almost every draw
    params = [sampled(), sampled(), SamplingParams(), SamplingParams()] * (rows_each // 2)
    suppress = [(0, 3), (), (0, 3), ()] * (rows_each // 2)
    ids = run_sampler(logits, params, seed=16, suppress=suppress).sampled_ids.cpu()
    suppressed = torch.tensor([bool(s) for s in suppress])
    assert not torch.isin(ids[suppressed], torch.tensor([0, 3])).any()
    assert torch.isin(ids[~suppressed], torch.tensor([0, 3])).float().mean() > 0.9
    masked = logits[0].clone()
    masked[[0, 3]] = float("-inf")
    assert (ids[2::4] == masked.argmax()).all()  # a greedy suppressed row takes the best allowed token
