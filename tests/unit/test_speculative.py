"""Speculative decoding: n-gram proposals, the verification's counters and adaptation, and outputs through the
engine that equal decoding one token per step (greedy and seeded, token for token; unseeded sampling in
distribution, by a chi-square test), whatever the proposals, with no block leaked."""
from __future__ import annotations

import asyncio
import functools
import itertools
import random

import numpy as np
import pytest
import torch

from llmserve.agent.sampler import Sampler
from llmserve.agent.sequence_table import SequenceTable
from llmserve.common.config import SpeculativeConfig, config_from_dict
from llmserve.common.protocol import StepResult
from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import step_inputs
from llmserve.master.speculative import NgramProposer, Speculator, best_draft_length
from tests.unit.fake_agent import VOCAB, counting_step, fake_engine
from tests.unit.test_engine_workload import engine_with, finish_of, run_workload


def proposals(tokens: list[int], k: int, min_n: int = 2, max_n: int = 4) -> list[int]:
    return NgramProposer(min_n, max_n)(np.array(tokens, dtype=np.int64), k)


def test_ngram_proposes_what_followed_the_latest_longest_match():
    assert proposals([5, 6, 7, 8, 9, 1, 2, 5, 6], 3) == [7, 8, 9]
    # 2-gram (1, 2) matches at two places; the 3-gram (0, 1, 2) only at the first: the longer wins
    assert proposals([0, 1, 2, 3, 4, 9, 1, 2, 8, 7, 0, 1, 2], 2) == [3, 4]
    assert proposals([1, 2, 3, 9, 1, 2, 4, 9, 1, 2], 2) == [4, 9]  # equally long: the latest
    assert proposals([1, 2, 3, 4, 5, 6], 3) == []  # no earlier occurrence
    assert proposals([7, 1, 2, 9, 1, 2], 3, min_n=3) == []  # only a 2-gram matches
    assert proposals([1, 2, 3, 4, 5, 1, 2], 10) == [3, 4, 5, 1, 2, 3, 4, 5, 1, 2]  # a loop goes on repeating
    assert proposals([4, 4, 4], 3) == [4, 4, 4]


def test_verification_counts_the_accepted_prefix():
    speculator = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False),
                            proposer=lambda tokens, k: [1] * k)
    assert speculator.propose(7, [3, 1], room=10) == [1, 1, 1, 1]
    assert speculator.propose(7, [3, 1], room=2) == [1, 1]
    assert speculator.verify(7, [5, 6, 7, 8], [5, 6, 0, 8, 9]) == 2  # the third differs: the fourth never counts
    assert speculator.verify(7, [5, 6, 7], [5, 6, 7, 1]) == 3
    assert speculator.verify(7, [1], [2, 3]) == 0
    assert speculator.stats() == {"spec_drafts": 3, "spec_draft_tokens": 8, "spec_accepted_tokens": 5,
                                  "spec_accepted_per_position": [2, 2, 1, 0]}


def test_the_draft_length_maximises_tokens_per_step_time():
    assert best_draft_length(0.9, 0.1, 8) == 8
    assert best_draft_length(0.5, 0.1, 8) == 2  # 1.75 / 1.2 beats 1.5 / 1.1 and 1.875 / 1.3
    assert best_draft_length(0.05, 0.1, 8) == 0  # 1.05 / 1.1 < 1: proposing does not pay
    assert best_draft_length(0.05, 0.0, 8) == 8  # free verification: always worth it


def test_proposals_that_keep_failing_pause_ever_longer_and_good_ones_grow_back():
    speculator = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4), proposer=lambda tokens, k: [1] * k)
    history = []
    for _ in range(40):  # every proposal rejected
        drafts = speculator.propose(7, [3, 1], room=10)
        history.append(len(drafts))
        if drafts:
            speculator.verify(7, drafts, [2] * (len(drafts) + 1))
    gaps = [len(list(run)) for is_zero, run in itertools.groupby(history, key=lambda n: n == 0) if is_zero]
    assert history[0] == 4 and gaps[:4] == [2, 4, 8, 16]  # paused 2, 4, 8, 16 steps between single-token probes
    for _ in range(100):  # then every proposal accepted (once the pause is over)
        drafts = speculator.propose(7, [3, 1], room=10)
        if drafts:
            speculator.verify(7, drafts, drafts + [1])
    assert speculator.propose(7, [3, 1], room=10) == [1, 1, 1, 1]


def counting_oracle(tokens: np.ndarray, k: int) -> list[int]:
    """The fake model's own continuation (last token + 1, + 2, ...): every proposal is accepted."""
    return [(int(tokens[-1]) + i) % VOCAB for i in range(1, k + 1)]


def half_right(seed: int):
    rng = random.Random(seed)

    def propose(tokens: np.ndarray, k: int) -> list[int]:
        return [token if rng.random() < 0.6 else rng.randrange(VOCAB) for token in counting_oracle(tokens, rng.randint(1, k))]
    return propose


@pytest.mark.parametrize("num_blocks, reserve", [(10, 0), (400, 16)])
def test_a_random_workload_with_speculation_gives_the_outputs_without_it_and_leaks_nothing(num_blocks, reserve):
    for seed in range(2):
        plain = asyncio.run(run_workload(engine_with(400, 16), seed))
        for proposer in (counting_oracle, half_right(seed), lambda tokens, k: [0] * k):
            engine = engine_with(num_blocks, reserve, {"method": "ngram", "num_speculative_tokens": 3})
            outputs = asyncio.run(run_workload(engine, seed, proposer))  # checks every step's blocks and tables
            common = plain.keys() & outputs.keys()
            assert len(common) >= 15
            assert {key: outputs[key] for key in common} == {key: plain[key] for key in common}
            assert engine.scheduler.speculator.num_draft_tokens > 0


def counting_draft_model(wrong_share: float, seed: int):
    """The fake agent's step, then draft proposals as an agent's draft model makes them: after each asking
    sequence's new token (its first sample that differs from its proposals, or the bonus), counting on,
    some tokens wrong."""
    rng = random.Random(seed)

    def step(header, inputs, outputs):
        result = counting_step(header, inputs, outputs)
        batch = step_inputs(inputs, header, suppress_width=1)
        proposals = outputs["draft_ids"][: header.num_seqs * header.draft_width].reshape(header.num_seqs, -1)
        proposals.fill(-1)
        sampled = outputs["sampled_ids"][: header.num_sample]
        starts = np.concatenate([[0], np.cumsum(batch.query_lens)[:-1]])
        for seq, (start, count, drafted) in enumerate(zip(starts, batch.query_lens, batch.num_draft_tokens)):
            rows = np.flatnonzero((batch.logits_indices >= start) & (batch.logits_indices < start + count))
            if not len(rows) or not batch.propose_counts[seq]:
                continue
            drafts, samples = batch.input_ids[start + count - drafted : start + count], sampled[rows]
            accepted = next((i for i in range(drafted) if drafts[i] != samples[i]), drafted)
            new = int(samples[accepted])
            for i in range(batch.propose_counts[seq]):
                right = (new + 1 + i) % VOCAB
                proposals[seq, i] = right if rng.random() >= wrong_share else rng.randrange(VOCAB)
        return result
    return step


@pytest.mark.parametrize("wrong_share", [0.0, 0.4])
def test_a_workload_with_draft_model_proposals_gives_the_outputs_without_them(wrong_share):
    for seed in range(2):
        plain = asyncio.run(run_workload(engine_with(400, 16), seed))
        engine = engine_with(10 if wrong_share else 400, 0, {"method": "draft", "draft_num_layers": 1,
                             "num_speculative_tokens": 3, "adaptive": False}, counting_draft_model(wrong_share, seed))
        outputs = asyncio.run(run_workload(engine, seed))  # checks every step's blocks and tables
        common = plain.keys() & outputs.keys()
        assert len(common) >= 15
        assert {key: outputs[key] for key in common} == {key: plain[key] for key in common}
        speculator = engine.scheduler.speculator
        assert speculator.num_accepted_tokens > 0
        assert (speculator.num_accepted_tokens == speculator.num_draft_tokens) == (wrong_share == 0)


def test_draft_model_proposals_near_the_end_of_the_context_stay_within_it():
    """Sequences decoding to max_seq_len (64, so 16 blocks of 4): no step asks for blocks past the table's
    most, every output is the one without proposals."""
    async def outputs_of(engine):
        await engine.start()
        try:
            handles = [engine.submit(f"r{i}", [100 + i] * (40 + i), SamplingParams(max_new_tokens=24 - i, ignore_eos=True),
                                     stream=False) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(finish_of(h) for h in handles)), timeout=60)
            assert all(not h.outputs[0].finish_reason == "error" for h in handles)
            return [h.outputs[0].output_ids for h in handles]
        finally:
            await engine.stop()
    speculative = {"method": "draft", "draft_num_layers": 1, "num_speculative_tokens": 4, "adaptive": False}
    engine = engine_with(400, 16, speculative, counting_draft_model(0.0, 0))
    assert asyncio.run(outputs_of(engine)) == asyncio.run(outputs_of(engine_with(400, 16)))
    assert engine.scheduler.speculator.num_accepted_tokens > 0


# ---------------------------------------------------------------- a Markov "model" sampled by the real sampler

SUPPORT = np.array([2, 10, 11, 12, 13])  # the tokens the model can produce: the end token (2) too


@functools.lru_cache(maxsize=None)
def markov_logits(seed: int = 0) -> torch.Tensor:
    """[VOCAB, VOCAB]: the next token's logits given the last one, on SUPPORT only."""
    rng = np.random.default_rng(seed)
    logits = np.full((VOCAB, VOCAB), -np.inf, dtype=np.float32)
    logits[:, SUPPORT] = rng.normal(0, 1.2, size=(VOCAB, len(SUPPORT)))
    return torch.from_numpy(logits)


def markov_step(logits_table: torch.Tensor, sampler: Sampler, suppress_width: int, table: SequenceTable):
    """An agent's step whose 'model' is the Markov table: the sampled rows come from the agent's sequence table."""
    def step(header, inputs, outputs):
        batch = step_inputs(inputs, header, suppress_width)
        table.check(header, batch)
        table.apply(header, batch)
        logits = logits_table[torch.from_numpy(batch.input_ids[batch.logits_indices])].clone()
        out = sampler(logits, table.sampling_rows(batch), header.is_all_greedy)
        outputs["sampled_ids"][: header.num_sample] = out.sampled_ids.numpy()
        if out.sampled_logprobs is not None:
            outputs["sampled_logprobs"][: header.num_sample] = out.sampled_logprobs.numpy()
        return StepResult(header.step_id, 0, {"predict": 0.1})
    return step


def markov_engine(speculative: bool, sampler_seed: int = 0):
    config = config_from_dict({
        "model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": VOCAB}, "tokenizer_path": "builtin"},
        "pa_config": {"num_blocks": 2048, "block_size": 4},
        "scheduler_config": {"decode_batch_size": 128, "max_num_batched_tokens": 1024, "prefill_batch_size": 128,
                             "max_queue_size": 4096},
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "adaptive": False} if speculative else {},
    })
    sampler, engines, table = Sampler(torch.device("cpu"), seed=sampler_seed), [], SequenceTable(16, 64)

    def step(header, inputs, outputs):
        return markov_step(markov_logits(), sampler, engines[0].suppress_width, table)(header, inputs, outputs)
    engines.append(fake_engine(config, max_seq_len=64, step_fn=step))
    return engines[0]


async def generate(engine, prompts: list[list[int]], params: list[SamplingParams], proposer=None) -> list[list[int]]:
    await engine.start()
    if proposer is not None:
        engine.scheduler.speculator.proposer = proposer
    try:
        handles = [engine.submit(f"r{i}", prompt, p, stream=False) for i, (prompt, p) in enumerate(zip(prompts, params))]
        await asyncio.wait_for(asyncio.gather(*(finish_of(h) for h in handles)), timeout=120)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return [h.outputs[0].output_ids for h in handles]
    finally:
        await engine.stop()


SEEDED = [
    SamplingParams(max_new_tokens=12, do_sample=True, seed=3),
    SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=3, seed=4),
    SamplingParams(max_new_tokens=12, do_sample=True, top_p=0.8, repetition_penalty=1.3, seed=5),
    SamplingParams(max_new_tokens=12, do_sample=True, presence_penalty=0.8, frequency_penalty=0.5, seed=6, logprobs=2),
    SamplingParams(max_new_tokens=12, no_repeat_ngram_size=2, min_new_tokens=5),
    SamplingParams(max_new_tokens=12),
    SamplingParams(max_new_tokens=12, do_sample=True, seed=8, min_new_tokens=7),  # the end token suppressed per position
    SamplingParams(max_new_tokens=12, do_sample=True, seed=9, stop_token_ids=(13,)),
]


def ngram_of_the_chain(tokens: np.ndarray, k: int) -> list[int]:
    return NgramProposer(1, 3)(tokens, k)


@pytest.mark.parametrize("proposer", [None, ngram_of_the_chain, lambda tokens, k: [int(SUPPORT[0])] * k],
                         ids=["ngram", "ngram-1", "end-token"])
def test_seeded_and_greedy_outputs_equal_decoding_without_speculation_token_for_token(proposer):
    prompts = [[10 + i % 4, 11, 12, 10, 11] for i in range(len(SEEDED))]
    plain = asyncio.run(generate(markov_engine(False), prompts, SEEDED))
    assert any(len(output) < 12 for output in plain)  # some end at the end token or a stop token
    engine = markov_engine(True)
    assert asyncio.run(generate(engine, prompts, SEEDED, proposer)) == plain
    assert engine.scheduler.speculator.num_accepted_tokens > 0


def chain_probabilities(logits: torch.Tensor, first: int) -> dict[tuple[int, int], float]:
    """P(t2, t3 | t1 = first) of the Markov model at temperature 1."""
    probs = torch.softmax(logits[:, SUPPORT], dim=-1).numpy()
    index = {int(t): i for i, t in enumerate(SUPPORT)}
    return {(int(a), int(b)): probs[first, index[int(a)]] * probs[int(a), index[int(b)]]
            for a, b in itertools.product(SUPPORT, SUPPORT)}


CHI2_DF24_P001 = 51.18  # the chi-square distribution's 99.9% quantile with 24 degrees of freedom


@pytest.mark.parametrize("proposer", [
    lambda tokens, k: [999] * k,  # always wrong: a token the model never gives
    lambda tokens, k: [int(SUPPORT[markov_logits()[int(tokens[-1]), SUPPORT].argmax()])] * k,  # often right
    ngram_of_the_chain,
], ids=["always-wrong", "mode", "ngram"])
def test_sampled_outputs_follow_the_target_distribution_with_any_proposer(proposer):
    """Tokens 2 and 3 of unseeded samples, given the first: a chi-square test against the chain's probabilities."""
    num = 1800
    prompt = [10, 11, 12, 13, 10]
    params = [SamplingParams(max_new_tokens=4, do_sample=True, ignore_eos=True)] * num
    engine = markov_engine(True, sampler_seed=1)
    outputs = asyncio.run(generate(engine, [prompt] * num, params, proposer))
    assert engine.scheduler.speculator.num_draft_tokens > num  # most decode steps verified proposals
    counts: dict[int, dict[tuple[int, int], int]] = {}
    for tokens in outputs:
        pair = (tokens[1], tokens[2])
        counts.setdefault(tokens[0], {})
        counts[tokens[0]][pair] = counts[tokens[0]].get(pair, 0) + 1
    first = max(counts, key=lambda t: sum(counts[t].values()))  # the most frequent first token: the most samples
    observed = counts[first]
    total = sum(observed.values())
    expected = chain_probabilities(markov_logits(), first)
    chi2 = sum((observed.get(cell, 0) - total * p) ** 2 / (total * p) for cell, p in expected.items())
    assert chi2 < CHI2_DF24_P001, (chi2, total, observed)


async def streamed(engine, prompt: list[int], params: SamplingParams, proposer=None):
    """Each streamed token's (id, text, finish reason, log-probability), the final output and the number of token
    events (a step's tokens come in one) of one streamed request."""
    await engine.start()
    if proposer is not None:
        engine.scheduler.speculator.proposer = proposer
    try:
        handle = engine.submit("r", prompt, params, stream=params.num_samples == 1)  # best_of: not streamed
        events = [event async for event in handle.stream()]
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        tokens = [(token_id, e.texts[i], e.finish_reason if i == len(e.token_ids) - 1 else None,
                   e.logprobs and e.logprobs[i].logprob) for e in events[:-1] for i, token_id in enumerate(e.token_ids)]
        return tokens, handle.outputs[0], len(events) - 1
    finally:
        await engine.stop()


def counting_with_logprobs(header, inputs, outputs):
    """The counting model, each token with a log-probability of its own."""
    result = counting_step(header, inputs, outputs)
    sampled = outputs["sampled_ids"][: header.num_sample]
    outputs["sampled_logprobs"][: header.num_sample] = -(sampled % 5) - 0.25
    return result


@pytest.mark.parametrize("extra", [{"logprobs": 0}, {"do_sample": True, "best_of": 2}], ids=["logprobs", "best_of"])
def test_a_stop_string_inside_an_accepted_run_cuts_the_output_where_decoding_one_token_at_a_time_stops(extra):
    prompt = [300, 301, 302]
    plain_events, plain, _ = asyncio.run(streamed(fake_engine(), prompt, SamplingParams(max_new_tokens=30, ignore_eos=True)))
    stop = plain.text[len(plain.text) // 2 :][:4]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop,), **extra)
    plain_engine = fake_engine(step_fn=counting_with_logprobs)
    expected_events, expected, num_expected_events = asyncio.run(streamed(plain_engine, prompt, params))
    engine = fake_engine(fake_config_with({"method": "ngram", "num_speculative_tokens": 8}), step_fn=counting_with_logprobs)
    events, output, num_events = asyncio.run(streamed(engine, prompt, params, counting_oracle))
    assert engine.metrics.num_generation_tokens == plain_engine.metrics.num_generation_tokens  # cut tokens uncounted
    assert output.text == expected.text == plain.text[: plain.text.index(stop)]
    assert output.output_ids == expected.output_ids and output.finish_reason == expected.finish_reason == "stop_sequence"
    assert events == expected_events and len(events) < len(plain_events)
    if "logprobs" in extra:  # streamed: each step's accepted run comes as one event
        assert num_expected_events == len(expected_events) and num_events < len(events)
    assert output.cumulative_logprob == expected.cumulative_logprob < 0


def fake_config_with(speculative: dict):
    return config_from_dict({
        "model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": VOCAB}, "tokenizer_path": "builtin"},
        "pa_config": {"num_blocks": 64, "block_size": 4}, "speculative_config": speculative,
    })


def test_a_large_batch_makes_verified_tokens_too_dear_to_propose():
    speculator = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4), proposer=lambda tokens, k: [1] * k)
    assert speculator.propose(1, [3, 1], room=10, num_running=16) == []  # each token would cost a whole step
    assert speculator.propose(2, [3, 1], room=10, num_running=2) == [1, 1]  # a new sequence: 2 of 3 accepted so far


def test_the_verified_rows_of_a_penalised_sequence_read_one_history_the_agent_keeps():
    from llmserve.common.step_arrays import StepCapacity, input_layout
    from llmserve.master.scheduler import ScheduledSeq, StepPlan
    from llmserve.master.sequence import Sequence
    from llmserve.master.step_builder import write_step

    capacity = StepCapacity(max_num_tokens=16, max_num_seqs=2, max_blocks_per_seq=4, history_capacity=16, max_num_rows=8)
    arrays = {name: np.zeros(n, dtype) for name, dtype, n in input_layout(capacity)}
    table = SequenceTable(capacity.max_blocks_per_seq, max_tokens=16)
    params = SamplingParams(repetition_penalty=1.2)
    seq = Sequence(1, [5, 6], params, frozenset({2}), 64, block_ids=[0, 3])
    seq.token_ids.append(7)  # one output token, not yet computed
    seq.num_computed, seq.agent_tokens = 2, 0
    other = Sequence(2, [1], params, frozenset({2}), 64, block_ids=[1])

    def run(items):
        header = write_step(StepPlan(items, sum(i.num_new_tokens for i in items), 0), arrays, 4, step_id=1)
        batch = step_inputs(arrays, header, capacity.suppress_width)
        table.check(header, batch)
        table.apply(header, batch)
        return header, table.sampling_rows(batch)

    header, rows = run([ScheduledSeq(seq, 3, True, draft_ids=[8, 9]), ScheduledSeq(other, 1, True)])
    assert header.num_new_params == 2 and header.num_history_ids == 6  # 5, 6, 7 and proposals 8, 9; then 1
    assert table.history(1) == [5, 6, 7, 8, 9] and table.history(2) == [1]
    assert rows.history_lens.tolist() == [3, 4, 5, 1]  # each verified row reads up to its own position
    assert len(set(rows.history_starts[:3].tolist())) == 1  # one copy of the sequence's tokens
    assert rows.seed_offsets[:3].tolist() == [1, 2, 3]  # each position's own noise
    seq.token_ids += [8, 10]  # 8 accepted, 10 drawn after it: the agent's 9 is cut back by the next delta
    seq.num_computed = 4
    header, rows = run([ScheduledSeq(seq, 1, True)])
    assert header.num_new_params == 0 and header.num_history_ids == 2  # from the first token not held right
    assert table.history(1) == [5, 6, 7, 8, 10] and rows.history_lens.tolist() == [5]
