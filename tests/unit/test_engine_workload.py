"""A seeded random workload through the engine and the fake agent on a tiny KV pool: arrivals, aborts, n
samples, beams and shared prefixes. Every step is checked on its way to the agent (token budget, batch
limits, the block manager's accounting, an agent-side copy of the block tables kept by the step's deltas
equal to the master's); every request ends, the pool is whole again, and what finished
on its own equals the same workload's outputs with ample blocks."""
from __future__ import annotations

import asyncio
import random
from typing import Optional

import numpy as np

from llmserve.agent.sequence_table import SequenceTable
from llmserve.common.config import config_from_dict
from llmserve.common.protocol import StepResult
from llmserve.common.sampling import SamplingParams
from llmserve.common.step_arrays import step_inputs
from llmserve.master.engine import FinishEvent
from tests.unit.fake_agent import VOCAB, counting_step, fake_engine

SCHEDULER = {"max_num_batched_tokens": 24, "decode_batch_size": 6, "prefill_batch_size": 3}


def engine_with(num_blocks: int, reserve: int, speculative: Optional[dict] = None, answer=counting_step,
                overlap: bool = True):
    config = config_from_dict({
        "model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": VOCAB}, "tokenizer_path": "builtin"},
        "pa_config": {"num_blocks": num_blocks, "block_size": 4},
        "scheduler_config": {**SCHEDULER, "reserve_new_tokens": reserve, "overlap_scheduling": overlap},
        "speculative_config": speculative or {},
    })
    engines, agent_tables = [], SequenceTable(max_blocks_per_seq=16, max_tokens=64)  # max_seq_len 64, blocks of 4

    def checked_step(header, inputs, outputs):
        engine = engines[0]
        engine.num_overlapped = getattr(engine, "num_overlapped", 0) + (header.follows_step >= 0)
        assert header.num_tokens <= SCHEDULER["max_num_batched_tokens"]
        assert engine.scheduler.num_slots <= SCHEDULER["decode_batch_size"]
        engine.block_manager.check_consistent(engine.scheduler.running)
        batch = step_inputs(inputs, header, suppress_width=1)
        agent_tables.check(header, batch)
        agent_tables.apply(header, batch)  # what an agent would attend through
        running = {seq.seq_id: seq for seq in engine.scheduler.running}
        pending = set(header.released_seq_ids) | set(engine.block_manager.take_released())
        engine.block_manager.release_again(sorted(pending - set(header.released_seq_ids)))
        assert set(agent_tables.row_of) <= set(running) | pending, "no table outlives its sequence on the agent"
        for row, seq_id in enumerate(batch.seq_ids.tolist()):
            if seq_id in running:  # not aborted while the step was on its way
                blocks = running[seq_id].block_ids
                assert agent_tables.held(seq_id) == blocks, "the agent's table follows the master's"
        check_sampling_rows(agent_tables.sampling_rows(batch), batch, running)
        return answer(header, inputs, outputs)

    engines.append(fake_engine(config, max_seq_len=64, step_fn=checked_step))
    return engines[0]


def check_sampling_rows(rows, batch, running: dict) -> None:
    """What the agent's sampler would read for each row: its sequence's parameters, sent once, and for a
    penalised sequence its tokens so far, kept as deltas (a pending token's place holds the id it stands for)."""
    for row, seq_row in enumerate(batch.row_seqs.tolist()):
        seq = running.get(int(batch.seq_ids[seq_row]))
        if seq is None:
            continue
        assert rows.repetition_penalty[row] == np.float32(seq.params.repetition_penalty)
        assert rows.seeds[row] == (-1 if seq.params.seed is None else seq.params.seed)
        if seq.params.needs_history:
            start, count = int(rows.history_starts[row]), int(rows.history_lens[row])
            history, known = rows.history[start : start + count].tolist(), seq.token_ids[:count]
            assert count > len(seq.prompt_ids) - 1 and all(k < 0 or h == k for h, k in zip(history, known))


def random_params(rng: random.Random) -> SamplingParams:
    max_new_tokens, kind = rng.randrange(1, 9), rng.random()
    if kind < 0.2:
        return SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, n=2, seed=rng.randrange(100), ignore_eos=True)
    if kind < 0.35:
        return SamplingParams(max_new_tokens=max_new_tokens, num_beams=2, n=2, ignore_eos=True)
    if kind < 0.5:  # the agent keeps its history
        return SamplingParams(max_new_tokens=max_new_tokens, repetition_penalty=1.2, ignore_eos=True)
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)


async def run_workload(engine, seed: int, proposer=None) -> dict[str, list[list[int]]]:
    """Submit 30 requests over time, abort some; the outputs of those that finished on their own. `proposer`
    replaces the speculator's (speculative_config on)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 900) for _ in range(rng.randrange(4, 12))] for _ in range(3)]
    await engine.start()
    if proposer is not None:
        engine.scheduler.speculator.proposer = proposer
    try:
        handles = []
        for i in range(30):
            prompt = rng.choice(prefixes) + [rng.randrange(3, 900) for _ in range(rng.randrange(1, 5))]
            handles.append(engine.submit(f"r{i}", prompt, random_params(rng), stream=False))
            if rng.random() < 0.15:
                engine.abort(rng.choice(handles))
            for _ in range(rng.randrange(0, 4)):
                await asyncio.sleep(0)  # let a few steps run between arrivals
        events = await asyncio.wait_for(asyncio.gather(*(finish_of(h) for h in handles)), timeout=60)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "no block leaked"
        engine.block_manager.check_consistent([])
        return {h.request_id: [o.output_ids for o in h.outputs] for h, e in zip(handles, events)
                if e.reason.value != "abort" and not e.error}
    finally:
        await engine.stop()


async def finish_of(handle) -> FinishEvent:
    while True:
        event = await handle.events.get()
        if isinstance(event, FinishEvent):
            return event


def test_a_random_workload_through_the_engine_keeps_every_step_within_limits_and_outputs_unchanged():
    for seed in range(3):
        tiny = asyncio.run(run_workload(engine_with(num_blocks=10, reserve=0), seed))  # preempted several times
        overlapped = engine_with(num_blocks=400, reserve=16)
        ample = asyncio.run(run_workload(overlapped, seed))
        serial = asyncio.run(run_workload(engine_with(num_blocks=400, reserve=16, overlap=False), seed))
        assert overlapped.num_overlapped > 5, "steps were planned while the one before ran"
        common = tiny.keys() & ample.keys() & serial.keys()
        assert len(common) >= 15
        assert {key: tiny[key] for key in common} == {key: ample[key] for key in common} == {key: serial[key] for key in common}


def test_a_sequence_that_stops_while_the_step_after_it_runs_ends_there_and_gives_its_blocks_back():
    async def outputs(overlap: bool):
        engine = engine_with(num_blocks=40, reserve=4, overlap=overlap)
        await engine.start()
        try:  # the fake model counts up from the prompt's last token: 13, 14, 15 ... 
            stops = engine.submit("stops", [10, 11, 12], SamplingParams(max_new_tokens=20, stop_token_ids=(15,)), stream=False)
            ends = engine.submit("ends", [40, 41], SamplingParams(max_new_tokens=6), stream=False)
            events = await asyncio.wait_for(asyncio.gather(finish_of(stops), finish_of(ends)), timeout=30)
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
            return [(event.reason.value, handle.outputs[0].output_ids) for event, handle in zip(events, (stops, ends))], \
                getattr(engine, "num_overlapped", 0)
        finally:
            await engine.stop()

    (with_overlap, num_overlapped), (serial, _) = asyncio.run(outputs(True)), asyncio.run(outputs(False))
    assert with_overlap == serial == [("stop_sequence", [13, 14, 15]), ("length", [42, 43, 44, 45, 46, 47])]
    assert num_overlapped >= 3


def test_a_failed_step_fails_its_requests_and_at_most_the_step_planned_ahead_of_it_no_more():
    def failing_step(header, inputs, outputs):
        if header.step_id == 8:
            return StepResult(header.step_id, 0, error="Traceback: the model raised")
        return counting_step(header, inputs, outputs)

    engine = engine_with(num_blocks=64, reserve=4, answer=failing_step)

    async def run():  # a request arrives every step or so, before, during and after the failure
        await engine.start()
        try:
            handles = []
            for i in range(40):
                handles.append(engine.submit(f"r{i}", [10 + i, 11 + i], SamplingParams(max_new_tokens=8), stream=False))
                await asyncio.sleep(0)
            return handles, await asyncio.wait_for(_finish_all(handles), timeout=30)
        finally:
            await engine.stop()

    handles, events = asyncio.run(run())
    failed = [h.request_id for h, event in zip(handles, events) if event.error]
    assert 0 < len(failed) <= 2 * SCHEDULER["decode_batch_size"], failed  # the failed step's and the next one's
    assert not any(event.error for event in events[-8:])  # no chain: later steps serve again
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


async def _finish_all(handles: list) -> list[FinishEvent]:
    """Every handle's finish event, in order, including handles added to the list while waiting."""
    events = []
    while len(events) < len(handles):
        events.append(await finish_of(handles[len(events)]))
    return events
