"""Automatic prefix caching in the block manager and the scheduler: plans in, plans out, no processes."""
from __future__ import annotations

import random

import numpy as np

from llmserve.common.config import SchedulerConfig
from llmserve.common.sampling import SamplingParams
from llmserve.master.beam_search import BeamSearch
from llmserve.master.block_manager import BlockManager
from llmserve.master.groups import BeamGroup
from llmserve.master.scheduler import PromptScores, Scheduler, StepSamples
from llmserve.master.sequence import FinishReason, Sequence
from tests.unit.test_scheduler import EOS, make_seq, run_step

BLOCK = 4


def caching_scheduler(num_blocks: int = 64, caching: bool = True, **overrides) -> Scheduler:
    return Scheduler(SchedulerConfig(**overrides), BlockManager(num_blocks, BLOCK, enable_caching=caching))


def serve(scheduler: Scheduler, seq: Sequence) -> list[int]:
    """Run `seq` alone to its end; the blocks it held."""
    scheduler.add(seq)
    held: list[int] = []
    while not seq.is_finished:
        plan = scheduler.schedule(0.0)
        assert plan is not None
        held = list(seq.block_ids)  # before the step's update frees them
        scheduler.update(plan, StepSamples(np.full(sum(i.num_rows for i in plan.scheduled), 5, dtype=np.int64)), 0.0)
    return held


def test_a_second_request_with_the_same_prompt_starts_from_the_first_ones_blocks():
    scheduler = caching_scheduler()
    first_blocks = serve(scheduler, make_seq(0, prompt_len=10, max_new_tokens=3))
    second = make_seq(1, prompt_len=10, max_new_tokens=3)
    scheduler.add(second)
    plan, _ = run_step(scheduler)
    assert [(item.seq, item.num_new_tokens) for item in plan.scheduled] == [(second, 2)]  # 8 of 10 were cached
    assert second.block_ids[:2] == first_blocks[:2]
    assert scheduler.blocks.num_hit_tokens == 8 and scheduler.blocks.num_queried_tokens == 20


def test_the_last_prompt_token_is_always_computed():
    scheduler = caching_scheduler()
    serve(scheduler, make_seq(0, prompt_len=8, max_new_tokens=2))
    second = make_seq(1, prompt_len=8, max_new_tokens=2)
    scheduler.add(second)
    plan, outcome = run_step(scheduler)
    assert plan.scheduled[0].num_new_tokens == 4 and plan.scheduled[0].samples  # block 2 holds the last token
    assert outcome.new_tokens == [(second, 5)]


def test_without_caching_every_prompt_is_computed_whole():
    scheduler = caching_scheduler(caching=False)
    serve(scheduler, make_seq(0, prompt_len=10, max_new_tokens=2))
    scheduler.add(make_seq(1, prompt_len=10, max_new_tokens=2))
    plan, _ = run_step(scheduler)
    assert plan.scheduled[0].num_new_tokens == 10


def test_running_sequences_with_a_common_prefix_share_its_blocks():
    scheduler = caching_scheduler()
    first = make_seq(0, prompt_len=9, max_new_tokens=8)
    scheduler.add(first)
    run_step(scheduler)
    second = make_seq(1, prompt_len=9, max_new_tokens=8)
    second.prompt_ids = first.prompt_ids[:8] + [99]  # same first two blocks, another last token
    second.token_ids = list(second.prompt_ids)
    scheduler.add(second)
    run_step(scheduler)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert [scheduler.blocks.ref_count(b) for b in first.block_ids[:2]] == [2, 2]
    scheduler.blocks.check_consistent(scheduler.running)


def test_a_different_prefix_misses_from_its_first_different_block():
    scheduler = caching_scheduler()
    serve(scheduler, make_seq(0, prompt_len=12, max_new_tokens=1))
    other = make_seq(1, prompt_len=12, max_new_tokens=1)
    other.prompt_ids = other.prompt_ids[:4] + [77] + other.prompt_ids[5:]
    other.token_ids = list(other.prompt_ids)
    scheduler.add(other)
    plan, _ = run_step(scheduler)
    assert plan.scheduled[0].num_new_tokens == 8  # block 1 differs, so block 2 (same tokens) cannot match either


def test_eviction_takes_the_least_recently_freed_blocks_a_prefixs_last_first():
    scheduler = caching_scheduler(num_blocks=4)
    serve(scheduler, make_seq(0, prompt_len=8, max_new_tokens=1))  # blocks 0, 1 cached, freed
    other = make_seq(1, prompt_len=12, max_new_tokens=1)
    other.prompt_ids = [50 + i for i in range(12)]
    other.token_ids = list(other.prompt_ids)
    serve(scheduler, other)  # needs 3 of the 4 blocks: evicts the oldest free ones
    again = make_seq(2, prompt_len=8, max_new_tokens=1)
    scheduler.add(again)
    plan, _ = run_step(scheduler)
    # the request between took 3 of the 4 blocks, the least recently freed first: the prefix's last block
    # (freed before its first) went, its first block stayed
    assert plan.scheduled[0].num_new_tokens == 4
    scheduler.blocks.check_consistent([] if again.is_finished else [again])


def test_a_preempted_sequence_resumes_from_its_cached_blocks():
    scheduler = caching_scheduler(num_blocks=16)
    seq = make_seq(0, prompt_len=10, max_new_tokens=20)
    scheduler.add(seq)
    for _ in range(4):
        run_step(scheduler)
    scheduler._preempt(seq)
    plan, _ = run_step(scheduler)
    assert plan.scheduled[0].seq is seq and plan.scheduled[0].num_new_tokens == seq.num_tokens - 1 - 12
    assert seq.num_computed == seq.num_tokens - 1


def test_reset_forgets_only_the_blocks_no_sequence_holds():
    scheduler = caching_scheduler()
    serve(scheduler, make_seq(0, prompt_len=10, max_new_tokens=1))
    running = make_seq(1, prompt_len=6, max_new_tokens=8)
    running.prompt_ids = [70 + i for i in range(6)]
    running.token_ids = list(running.prompt_ids)
    scheduler.add(running)
    run_step(scheduler)
    assert scheduler.blocks.reset_cache() == 2  # the finished request's two full blocks
    assert scheduler.blocks.lookup(make_seq(2, prompt_len=10)) == []
    scheduler.blocks.check_consistent(scheduler.running)


class HistoryModel:
    """A deterministic stand-in for the model: each sampled token, and a beam row's candidates, are a function
    of the sequence's tokens."""

    WIDTH = 8

    def tokens(self, plan) -> StepSamples:
        ids, top_ids, top_logprobs = [], [], []
        for item in plan.scheduled:
            base = sum(item.seq.token_ids) * 31 + len(item.seq.token_ids)
            for row in range(item.num_rows):
                ids.append(EOS if base % 23 == 0 else 3 + (base + row) % 50)
                candidates = [3 + (base + 7 * k) % 50 for k in range(self.WIDTH)]
                top_ids.append([EOS, *candidates[1:]] if base % 11 == 0 else candidates)
                top_logprobs.append([-0.3 * (k + 1) - (base % 5) * 0.01 for k in range(self.WIDTH)])
        return StepSamples(np.asarray(ids, dtype=np.int64), topk_ids=np.asarray(top_ids, dtype=np.int32).reshape(-1, self.WIDTH),
                           topk_logprobs=np.asarray(top_logprobs, dtype=np.float32).reshape(-1, self.WIDTH))


SMALLEST_POOL = 10  # blocks


def random_request(rng: random.Random, seq_id: int, prefixes: list[list[int]]) -> Sequence:
    """A prompt starting with one of `prefixes`: greedy, n = 2 samples, or a beam search of 2-3 beams, with
    every sample's own blocks fitting SMALLEST_POOL (as the engine refuses requests that could not)."""
    prompt = rng.choice(prefixes) + [rng.randrange(3, 60) for _ in range(rng.randrange(1, 6))]
    kind, num_beams, max_new_tokens = rng.random(), rng.randrange(2, 4), rng.randrange(1, 12)
    samples = 2 if kind < 0.2 else num_beams if kind < 0.35 else 1
    if SMALLEST_POOL // samples * BLOCK <= len(prompt):
        kind, samples = 1.0, 1  # too long to sample several times in the smallest pool
    max_new_tokens = min(max_new_tokens, SMALLEST_POOL // samples * BLOCK - len(prompt))
    seq = make_seq(seq_id, prompt_len=len(prompt), max_new_tokens=max_new_tokens)
    seq.prompt_ids, seq.token_ids = prompt, list(prompt)
    if kind < 0.2:
        seq.params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, n=2)
        seq.pending_forks = 1
    elif kind < 0.35:
        seq.params = SamplingParams(max_new_tokens=max_new_tokens, num_beams=num_beams)
        search = BeamSearch(num_beams, 1.0, False, seq.params.max_new_tokens, frozenset({EOS}))
        seq.beam = BeamGroup(search, [seq], {seq.seq_id: np.float32(0.0)})
    return seq


def simulate(caching: bool, seed: int, num_blocks: int = 14, reserve: int = 16) -> dict[tuple[int, int], list[int]]:
    """Requests with shared prefixes arriving over time (greedy, n = 2, beams), some aborted, on a pool of
    `num_blocks`; every plan checked against the budgets and the block manager after every step. The
    outputs of every sample and beam search that finished on its own, by (request, index)."""
    rng = random.Random(seed)
    config = dict(max_num_batched_tokens=32, decode_batch_size=8, prefill_batch_size=4, reserve_new_tokens=reserve)
    scheduler = caching_scheduler(num_blocks=num_blocks, caching=caching, **config)
    prefixes = [[rng.randrange(3, 60) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    requests, samples_of, model = [], {}, HistoryModel()
    for step in range(600):
        if len(requests) < 30 and rng.random() < 0.3:
            seq = random_request(rng, 1000 + len(requests), prefixes)
            requests.append(seq)
            samples_of[seq.seq_id] = [seq]
            scheduler.add(seq)
        if requests and rng.random() < 0.02:
            victim = rng.choice(requests)  # a request: all its beams, or its first sample (the others run on)
            for seq in list(victim.beam.beams) if victim.beam is not None else [victim]:
                scheduler.abort(seq)
        plan = scheduler.schedule(float(step))
        if plan is not None:
            assert plan.num_tokens <= config["max_num_batched_tokens"] and plan.num_prefill_seqs <= config["prefill_batch_size"]
            assert scheduler.num_slots <= config["decode_batch_size"]
            for parent, child in scheduler.update(plan, model.tokens(plan), float(step)).forked:
                samples_of[parent.seq_id].append(child)
        scheduler.blocks.check_consistent(list(scheduler.running))
    assert not scheduler.running and not scheduler.waiting, "every request ends (no deadlock)"
    assert (scheduler.blocks.num_hit_tokens > 0) == caching
    assert max(seq.num_preemptions for seqs in samples_of.values() for seq in seqs) <= 2
    outputs = {}
    for request in requests:
        if request.beam is not None and request.finish_reason is not FinishReason.ABORT:
            outputs.update(((request.seq_id, i), h.output_ids) for i, h in enumerate(request.beam.search.results(2)))
        elif request.beam is None:
            outputs.update(((request.seq_id, seq.sample_index), seq.output_ids) for seq in samples_of[request.seq_id]
                           if seq.finish_reason not in (None, FinishReason.ABORT))
    return outputs


def test_a_random_workload_keeps_the_blocks_consistent_and_the_outputs_unchanged_by_caching_and_preemption():
    for seed in range(3):
        runs = [simulate(caching=True, seed=seed), simulate(caching=False, seed=seed),
                simulate(caching=True, seed=seed, num_blocks=400),  # no preemption
                simulate(caching=True, seed=seed, num_blocks=SMALLEST_POOL, reserve=0),  # preempted often
                simulate(caching=False, seed=seed, num_blocks=SMALLEST_POOL, reserve=0)]
        common = set.intersection(*(set(run) for run in runs))
        assert len(common) >= 20
        for run in runs[1:]:
            assert {key: run[key] for key in common} == {key: runs[0][key] for key in common}


def test_a_cache_salt_keeps_identical_prompts_of_two_tenants_apart():
    scheduler = caching_scheduler()
    first = make_seq(0, prompt_len=10, max_new_tokens=1)
    first.cache_salt = "tenant-a"
    serve(scheduler, first)
    for seq_id, salt, expected_new in ((1, "tenant-b", 10), (2, None, 10), (3, "tenant-a", 2)):
        seq = make_seq(seq_id, prompt_len=10, max_new_tokens=1)
        seq.cache_salt = salt
        scheduler.add(seq)
        plan, _ = run_step(scheduler)
        assert plan.scheduled[0].num_new_tokens == expected_new, salt


def scoring_samples(plan) -> StepSamples:
    """Token 5 for every sampled row; each scored prompt position gets -(its target token) as log-probability."""
    targets = [t for item in plan.scheduled for t in item.seq.token_ids[item.first_scored + 1:][: item.num_scored]]
    scored = len(targets)
    prompt = PromptScores(-np.asarray(targets, dtype=np.float32), np.ones(scored, np.int32),
                          np.zeros((scored, 1), np.int32), np.zeros((scored, 1), np.float32))
    return StepSamples(np.full(sum(i.num_rows for i in plan.scheduled), 5, dtype=np.int64), prompt=prompt)


def test_a_request_for_prompt_logprobs_scores_every_prompt_token_despite_cache_hits_and_chunks():
    scheduler = caching_scheduler(max_num_batched_tokens=8, decode_batch_size=4)
    serve(scheduler, make_seq(0, prompt_len=20, max_new_tokens=1))  # every full block of the prompt is cached
    seq = make_seq(1, prompt_len=20, max_new_tokens=2)
    seq.params = SamplingParams(max_new_tokens=2, prompt_logprobs=0)
    scheduler.add(seq)
    chunks = []
    while not seq.is_finished:
        plan = scheduler.schedule(0.0)
        chunks += [item.num_new_tokens for item in plan.scheduled]
        scheduler.update(plan, scoring_samples(plan), 0.0)
    assert chunks[:3] == [8, 8, 4]  # the whole prompt computed, in chunks of the step budget
    assert [lp.logprob for lp in seq.prompt_logprobs] == [-float(t) for t in seq.prompt_ids[1:]]


def test_a_preempted_request_resumes_from_the_cache_only_over_the_positions_it_has_scored():
    scheduler = caching_scheduler()
    seq = make_seq(0, prompt_len=20, max_new_tokens=2)
    seq.params = SamplingParams(max_new_tokens=2, prompt_logprobs=0)
    seq.token_ids = list(seq.prompt_ids)
    serve(scheduler, make_seq(1, prompt_len=20, max_new_tokens=1))
    seq.prompt_logprobs = [None] * 9  # as if a preemption came after the first 9 positions were scored
    assert len(scheduler.blocks.lookup(seq)) == 9 // BLOCK
    seq.params = SamplingParams(max_new_tokens=2)
    assert len(scheduler.blocks.lookup(seq)) == 19 // BLOCK


def fits_whole_pool(blocks: BlockManager, prompt_len: int, num_new: int, samples: int) -> bool:
    """The engine's admission rule: the samples, sharing the prompt, fit the whole pool."""
    return blocks.blocks_for(prompt_len + num_new) + (samples - 1) * (blocks.blocks_for(num_new) + 1) <= blocks.num_blocks


def beam_heavy_run(seed: int, num_blocks: int, caching: bool, reserve: int) -> int:
    """12 requests, 40% beam searches of 2 beams, in a pool that fits each alone; the steps taken."""
    rng = random.Random(seed)
    scheduler = caching_scheduler(num_blocks=num_blocks, caching=caching, max_num_batched_tokens=24, decode_batch_size=6,
                                  prefill_batch_size=3, reserve_new_tokens=reserve)
    for seq_id in range(12):
        num_new, beam, prompt_len = rng.randrange(1, 12), rng.random() < 0.4, rng.randrange(2, 10)
        while num_new > 1 and not fits_whole_pool(scheduler.blocks, prompt_len, num_new, 2 if beam else 1):
            num_new -= 1
        seq = make_seq(seq_id, prompt_len=prompt_len, max_new_tokens=num_new)
        seq.prompt_ids = [rng.randrange(3, 60) for _ in range(prompt_len)]
        seq.token_ids = list(seq.prompt_ids)
        if beam:
            seq.params = SamplingParams(max_new_tokens=seq.params.max_new_tokens, num_beams=2, n=2, ignore_eos=True)
            search = BeamSearch(2, 1.0, False, seq.params.max_new_tokens, frozenset({EOS}))
            seq.beam = BeamGroup(search, [seq], {seq.seq_id: np.float32(0.0)})
        scheduler.add(seq)
    model = HistoryModel()
    for step in range(2000):
        if not scheduler.num_unfinished:
            return step
        plan = scheduler.schedule(0.0)
        assert plan is not None, "a step can always run while requests are left"
        scheduler.update(plan, model.tokens(plan), 0.0)
        scheduler.blocks.check_consistent(scheduler.running)
    raise AssertionError("requests left after 2000 steps (livelock)")


def test_beam_searches_in_a_tiny_pool_never_deadlock_on_preempted_siblings():
    for seed in range(12):
        for num_blocks, caching, reserve in ((8, False, 0), (8, True, 0), (12, True, 16), (8, False, 16)):
            beam_heavy_run(seed, num_blocks, caching, reserve)
