"""The scheduler and block manager as specifications: plans in, plans out, no processes."""
from __future__ import annotations

import numpy as np
import pytest

from llmserve.common.config import SchedulerConfig
from llmserve.common.sampling import SamplingParams
from llmserve.master.block_manager import BlockManager
from llmserve.master.scheduler import Scheduler, StepSamples
from llmserve.master.sequence import FinishReason, Sequence, SequenceStatus

EOS = 2


def make_seq(seq_id: int, prompt_len: int, max_new_tokens: int = 8, arrival: float = 0.0) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        prompt_ids=list(range(10, 10 + prompt_len)),
        params=SamplingParams(max_new_tokens=max_new_tokens),
        eos_token_ids=frozenset({EOS}),
        max_seq_len=4096,
        arrival_time=arrival,
    )


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **overrides) -> Scheduler:
    return Scheduler(SchedulerConfig(**overrides), BlockManager(num_blocks, block_size))


def samples(ids) -> StepSamples:
    return StepSamples(np.asarray(ids, dtype=np.int64))


def run_step(scheduler: Scheduler, now: float = 0.0, token: int = 5):
    plan = scheduler.schedule(now)
    assert plan is not None
    outcome = scheduler.update(plan, samples([token] * sum(item.num_rows for item in plan.scheduled)), now)
    scheduler.blocks.check_consistent(scheduler.running)
    return plan, outcome


def test_prefill_then_decode_one_token_each_step():
    scheduler = make_scheduler()
    seq = make_seq(0, prompt_len=6)
    scheduler.add(seq)
    plan, outcome = run_step(scheduler)
    assert [(i.seq, i.num_new_tokens, i.samples) for i in plan.scheduled] == [(seq, 6, True)]
    assert outcome.new_tokens == [(seq, 5)]
    plan, _ = run_step(scheduler)
    assert plan.is_decode_only and plan.scheduled[0].num_new_tokens == 1
    assert seq.num_computed == 7 and seq.num_tokens == 8


def test_sequence_finishes_at_max_new_tokens_and_frees_blocks():
    scheduler = make_scheduler(num_blocks=8)
    seq = make_seq(0, prompt_len=3, max_new_tokens=3)
    scheduler.add(seq)
    for _ in range(3):
        _, outcome = run_step(scheduler)
    assert outcome.finished == [seq]
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_output_tokens == 3
    assert scheduler.blocks.num_free_blocks == 8
    assert scheduler.schedule(0.0) is None


def test_eos_finishes_unless_ignored():
    scheduler = make_scheduler()
    stops, ignores = make_seq(0, 3), make_seq(1, 3)
    ignores.params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    scheduler.add(stops)
    scheduler.add(ignores)
    _, outcome = run_step(scheduler, token=EOS)
    assert outcome.finished == [stops] and stops.finish_reason is FinishReason.EOS
    assert ignores.status is SequenceStatus.RUNNING


def test_continuous_batching_admits_new_requests_while_others_decode():
    scheduler = make_scheduler()
    first = make_seq(0, 4, max_new_tokens=10)
    scheduler.add(first)
    run_step(scheduler)
    second = make_seq(1, 4)
    scheduler.add(second)
    plan, _ = run_step(scheduler)
    assert {item.seq.seq_id for item in plan.scheduled} == {0, 1}
    assert plan.num_prefill_seqs == 1


def test_static_batching_runs_the_batch_to_completion_first():
    scheduler = make_scheduler(batching_strategy="static")
    first = make_seq(0, 4, max_new_tokens=3)
    scheduler.add(first)
    run_step(scheduler)
    second = make_seq(1, 4)
    scheduler.add(second)
    plan, _ = run_step(scheduler)
    assert [item.seq for item in plan.scheduled] == [first]
    run_step(scheduler)
    assert first.is_finished
    plan, _ = run_step(scheduler)
    assert [item.seq for item in plan.scheduled] == [second]


def test_prefill_batch_size_limits_new_sequences_per_step():
    scheduler = make_scheduler(prefill_batch_size=2)
    for i in range(5):
        scheduler.add(make_seq(i, 3))
    plan, _ = run_step(scheduler)
    assert plan.num_prefill_seqs == 2


def test_decode_batch_size_limits_running_sequences():
    scheduler = make_scheduler(decode_batch_size=3)
    for i in range(5):
        scheduler.add(make_seq(i, 3))
    plan, _ = run_step(scheduler)
    assert len(plan.scheduled) == 3
    assert len(scheduler.waiting) == 2


def test_long_prompt_is_chunked_to_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    seq = make_seq(0, prompt_len=20)
    scheduler.add(seq)
    sizes = []
    while seq.num_output_tokens == 0:
        plan, _ = run_step(scheduler)
        sizes.append((plan.scheduled[0].num_new_tokens, plan.scheduled[0].samples))
    assert sizes == [(8, False), (8, False), (4, True)]


def test_chunked_prefill_shares_the_step_with_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    short = make_seq(0, 3, max_new_tokens=20)
    scheduler.add(short)
    run_step(scheduler)
    long = make_seq(1, 30)
    scheduler.add(long)
    plan, _ = run_step(scheduler)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in plan.scheduled] == [(0, 1), (1, 7)]


def test_without_chunked_prefill_a_long_prompt_waits_for_a_whole_budget():
    scheduler = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    scheduler.add(make_seq(0, 6))
    scheduler.add(make_seq(1, 6))
    plan, _ = run_step(scheduler)
    assert [i.seq.seq_id for i in plan.scheduled] == [0]


def test_preempts_newest_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=4, block_size=4, reserve_new_tokens=0)  # admitted as soon as the prompts fit
    old, new = make_seq(0, 4, max_new_tokens=20), make_seq(1, 4, max_new_tokens=20)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefilled: one full block each
    preempted = []
    for _ in range(8):
        plan, _ = run_step(scheduler)
        preempted += plan.preempted
    assert preempted and preempted[0] is new
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.num_output_tokens == 9


def test_preempted_sequence_is_recomputed_with_its_outputs_and_finishes():
    scheduler = make_scheduler(num_blocks=4, block_size=4, reserve_new_tokens=0)
    seqs = [make_seq(i, 4, max_new_tokens=6) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    recompute_sizes = []
    for _ in range(40):
        plan = scheduler.schedule(0.0)
        if plan is None:
            break
        recompute_sizes += [i.num_new_tokens for i in plan.scheduled if i.seq.num_preemptions and i.num_new_tokens > 1]
        scheduler.update(plan, samples([5] * sum(i.num_rows for i in plan.scheduled)), 0.0)
    assert all(seq.is_finished and seq.num_output_tokens == 6 for seq in seqs)
    assert recompute_sizes, "the preempted sequence was recomputed from prompt plus outputs"
    assert scheduler.blocks.num_free_blocks == 4


def run_to_end(scheduler: Scheduler, max_steps: int = 2000) -> list:
    """Steps until nothing is left; every plan."""
    plans = []
    while scheduler.num_unfinished and len(plans) < max_steps:
        plan, _ = run_step(scheduler)
        plans.append(plan)
    assert not scheduler.num_unfinished, "every request ends (no deadlock)"
    return plans


def test_admission_keeps_room_for_the_reserved_growth_of_running_sequences():
    scheduler = make_scheduler(num_blocks=12, block_size=4, reserve_new_tokens=64)
    seqs = [make_seq(i, 4, max_new_tokens=16) for i in range(6)]  # 5 blocks each at the end
    for seq in seqs:
        scheduler.add(seq)
    plans = run_to_end(scheduler)
    assert scheduler.num_preemptions == 0
    assert len(plans[0].scheduled) == 2  # a third starting with them would outgrow the 12 blocks
    assert max(len(plan.scheduled) for plan in plans) == 3  # one starts while two others are near their end
    assert all(seq.num_output_tokens == 16 for seq in seqs)


def test_without_a_reservation_a_request_is_preempted_at_most_once_and_outputs_are_unchanged():
    outputs = {}
    for num_blocks in (12, 200):
        scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, reserve_new_tokens=0)
        seqs = [make_seq(i, 4, max_new_tokens=16) for i in range(8)]
        for seq in seqs:
            scheduler.add(seq)
        for plan in run_to_end(scheduler):
            assert plan.num_tokens <= scheduler.config.max_num_batched_tokens
        outputs[num_blocks] = [seq.output_ids for seq in seqs]
        assert max(seq.num_preemptions for seq in seqs) <= 1
    assert outputs[12] == outputs[200]


def test_a_preempted_sequence_resumes_before_newer_requests_are_admitted():
    scheduler = make_scheduler(num_blocks=6, block_size=4, reserve_new_tokens=0)
    old, new = make_seq(0, 4, max_new_tokens=12), make_seq(1, 4, max_new_tokens=12)
    scheduler.add(old)
    scheduler.add(new)
    while not new.num_preemptions:
        run_step(scheduler)
    late = make_seq(2, 2, max_new_tokens=2)
    scheduler.add(late)
    first_admitted = None
    while first_admitted is None:
        plan, _ = run_step(scheduler)
        first_admitted = next((i.seq for i in plan.scheduled if i.seq is not old), None)
    assert first_admitted is new


def test_a_resumed_sequence_is_not_the_victim_while_one_never_preempted_can_be():
    scheduler = make_scheduler(num_blocks=8, block_size=4, reserve_new_tokens=0)
    resumed = make_seq(0, 4, max_new_tokens=16)
    resumed.num_preemptions = 1  # as if preempted before: it may not be again while others can make room
    fresh = make_seq(1, 4, max_new_tokens=16)
    scheduler.running += [fresh, resumed]
    for seq in (fresh, resumed):
        scheduler.blocks.grow(seq, 4)
        seq.status, seq.num_computed = SequenceStatus.RUNNING, 4
        seq.token_ids.append(5)
    plans = run_to_end(scheduler)
    assert resumed.num_preemptions == 1 and fresh.num_preemptions >= 1
    assert any(fresh in plan.preempted for plan in plans)


def test_a_table_the_agents_hold_is_released_even_after_copy_on_write_of_its_first_block():
    blocks = BlockManager(8, 4)
    parent, child = make_seq(0, 2), make_seq(1, 2)
    blocks.grow(parent, 2)
    parent.agent_blocks, parent.on_agents = 1, True  # as the step builder leaves a sequence it sent
    blocks.fork(parent, child)
    parent.num_computed = 2
    assert blocks.grow(parent, 3) and parent.agent_blocks == 0  # copy-on-write of the shared block 0
    blocks.free(parent)
    assert blocks.take_released() == [0]


def test_a_single_sequence_larger_than_free_blocks_never_deadlocks():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    seq = make_seq(0, 4, max_new_tokens=8)  # 12 tokens: exactly the whole pool
    scheduler.add(seq)
    for _ in range(20):
        if seq.is_finished:
            break
        run_step(scheduler)
    assert seq.is_finished and seq.num_output_tokens == 8


def test_abort_frees_blocks_of_running_and_waiting_sequences():
    scheduler = make_scheduler(num_blocks=16, decode_batch_size=1)
    running, waiting = make_seq(0, 8), make_seq(1, 8)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    assert scheduler.blocks.num_free_blocks < 16
    scheduler.abort(running)
    scheduler.abort(waiting)
    assert scheduler.blocks.num_free_blocks == 16
    assert running.finish_reason is FinishReason.ABORT and scheduler.num_unfinished == 0


def test_sequence_aborted_during_a_step_is_ignored_by_update():
    scheduler = make_scheduler(num_blocks=16)
    seq = make_seq(0, 4)
    scheduler.add(seq)
    plan = scheduler.schedule(0.0)
    scheduler.abort(seq)
    outcome = scheduler.update(plan, samples([5]), 0.0)
    assert outcome.new_tokens == [] and scheduler.blocks.num_free_blocks == 16


def test_batch_waiting_time_holds_prefill_until_the_batch_fills_or_time_passes():
    scheduler = make_scheduler(prefill_batch_size=3, batch_waiting_time=0.5)
    scheduler.add(make_seq(0, 3, arrival=10.0))
    assert scheduler.schedule(10.1) is None
    assert scheduler.next_wakeup(10.1) == pytest.approx(10.5)
    scheduler.add(make_seq(1, 3, arrival=10.2))
    scheduler.add(make_seq(2, 3, arrival=10.3))
    plan = scheduler.schedule(10.3)
    assert plan is not None and plan.num_prefill_seqs == 3


def test_batch_waiting_time_releases_a_lone_request_when_it_expires():
    scheduler = make_scheduler(prefill_batch_size=3, batch_waiting_time=0.5)
    scheduler.add(make_seq(0, 3, arrival=10.0))
    assert scheduler.schedule(10.6).num_prefill_seqs == 1


def test_decode_batch_waiting_time_spaces_out_small_decode_steps():
    scheduler = make_scheduler(decode_batch_size=4, decode_batch_waiting_time=0.2)
    scheduler.add(make_seq(0, 3))
    run_step(scheduler, now=1.0)
    assert scheduler.schedule(1.1) is None
    assert scheduler.schedule(1.25) is not None


def test_without_chunked_prefill_a_prompt_longer_than_the_budget_is_chunked_rather_than_stuck():
    scheduler = make_scheduler(enable_chunked_prefill=False, max_num_batched_tokens=8)
    seq = make_seq(0, prompt_len=20)
    scheduler.add(seq)
    chunks = [run_step(scheduler)[0].scheduled[0].num_new_tokens for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert seq.num_output_tokens == 1


def make_sampled_seq(seq_id: int, prompt_len: int, n: int, max_new_tokens: int = 8) -> Sequence:
    seq = make_seq(seq_id, prompt_len, max_new_tokens)
    seq.params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, n=n)
    seq.pending_forks = n - 1
    return seq


def test_n_samples_share_the_prompt_blocks_and_copy_the_partial_block_on_write():
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    seq = make_sampled_seq(0, prompt_len=10, n=3)
    scheduler.add(seq)
    plan = scheduler.schedule(0.0)
    assert plan.scheduled[0].num_rows == 3  # three draws from the prompt's last logits
    outcome = scheduler.update(plan, samples([5, 6, 7]), 0.0)
    children = [child for _, child in outcome.forked]
    assert [s.output_ids for s in [seq, *children]] == [[5], [6], [7]]
    assert all(child.block_ids == seq.block_ids for child in children)
    assert [scheduler.blocks.ref_count(b) for b in seq.block_ids] == [3, 3, 3]
    assert scheduler.blocks.num_free_blocks == 16 - 3  # one prompt's worth, not three
    plan, _ = run_step(scheduler)
    shared_last = seq.block_ids[0:2]
    # position 10 lands in the third block, shared and half full: two sequences copy it, the last keeps it
    assert len(plan.block_copies) == 2
    assert all(children[i].block_ids[:2] == shared_last for i in range(2))
    assert scheduler.blocks.num_free_blocks == 16 - 5
    assert len({tuple(s.block_ids) for s in [seq, *children]}) == 3


def test_a_plan_with_block_copies_is_never_deferred():
    scheduler = make_scheduler(num_blocks=16, block_size=4, decode_batch_waiting_time=10.0, decode_batch_size=8)
    scheduler.add(make_sampled_seq(0, prompt_len=10, n=2))
    run_step(scheduler, now=0.0)
    plan = scheduler.schedule(now=0.001)
    assert plan is not None and plan.block_copies


def test_preempting_one_sample_keeps_the_blocks_its_siblings_share():
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    seq = make_sampled_seq(0, prompt_len=8, n=2)
    scheduler.add(seq)
    _, outcome = run_step(scheduler)
    child = outcome.forked[0][1]
    scheduler._preempt(child)
    assert seq.block_ids and all(scheduler.blocks.ref_count(b) == 1 for b in seq.block_ids)
    assert scheduler.blocks.num_free_blocks == 16 - len(seq.block_ids)


def test_admission_reserves_a_decode_slot_for_every_sample():
    scheduler = make_scheduler(decode_batch_size=4)
    scheduler.add(make_sampled_seq(0, prompt_len=4, n=3))
    scheduler.add(make_sampled_seq(1, prompt_len=4, n=2))
    plan = scheduler.schedule(0.0)
    assert [item.seq.seq_id for item in plan.scheduled] == [0]


# ------------------------------------------------------------------ overlapped scheduling (planning ahead)


def launch(scheduler: Scheduler, ahead: bool = False):
    plan = scheduler.schedule(0.0, ahead=ahead)
    assert plan is not None
    scheduler.launch(plan)
    return plan


def test_a_plan_made_ahead_feeds_each_pending_token_as_a_placeholder_for_its_row():
    scheduler = make_scheduler()
    first, second = make_seq(0, prompt_len=5), make_seq(1, prompt_len=3)
    scheduler.add(first)
    scheduler.add(second)
    now = launch(scheduler)  # both prefills, rows 0 and 1
    assert scheduler.may_look_ahead(now)
    assert first.token_ids[-1] == -1 and second.token_ids[-1] == -2 and first.num_settled == 5
    ahead = launch(scheduler, ahead=True)
    assert [(item.seq, item.num_new_tokens, item.samples) for item in ahead.scheduled] == [(first, 1, True), (second, 1, True)]
    assert first.num_computed == 6 and first.token_ids[-2:] == [-1, -1]  # its row in the plan ahead is row 0 again
    scheduler.update(now, samples([7, 8]), 0.0)
    assert first.token_ids[5:] == [7, -1] and second.token_ids[3:] == [8, -2] and first.num_pending == 1
    outcome = scheduler.update(ahead, samples([9, 4]), 0.0)
    assert outcome.new_tokens == [(first, 9), (second, 4)]
    assert first.output_ids == [7, 9] and second.output_ids == [8, 4] and first.num_pending == 0
    scheduler.blocks.check_consistent(scheduler.running)


def test_a_sequence_whose_pending_token_is_its_last_is_not_planned_ahead():
    scheduler = make_scheduler()
    short, long = make_seq(0, prompt_len=4, max_new_tokens=1), make_seq(1, prompt_len=4, max_new_tokens=5)
    scheduler.add(short)
    scheduler.add(long)
    now = launch(scheduler)
    ahead = launch(scheduler, ahead=True)
    assert [item.seq for item in ahead.scheduled] == [long]
    outcome = scheduler.update(now, samples([7, 8]), 0.0)
    assert outcome.finished == [short] and short.output_ids == [7]


def test_a_sequence_that_ends_while_the_step_after_runs_drops_that_steps_token_and_its_blocks():
    scheduler = make_scheduler(num_blocks=8)
    seq, other = make_seq(0, prompt_len=4), make_seq(1, prompt_len=4)
    scheduler.add(seq)
    scheduler.add(other)
    now = launch(scheduler)
    ahead = launch(scheduler, ahead=True)
    outcome = scheduler.update(now, samples([EOS, 5]), 0.0)  # seq ends; its row in the step ahead is wasted
    assert outcome.finished == [seq] and seq.output_ids == [EOS] and seq.finish_reason is FinishReason.EOS
    assert seq.block_ids == [] and seq.num_pending == 0
    outcome = scheduler.update(ahead, samples([6, 6]), 0.0)
    assert outcome.new_tokens == [(other, 6)] and seq.output_ids == [EOS]
    scheduler.blocks.check_consistent(scheduler.running)
    assert scheduler.blocks.num_free_blocks == 8 - len(other.block_ids)


def test_a_plan_made_ahead_never_preempts_a_sequence_short_of_blocks_waits():
    scheduler = make_scheduler(num_blocks=2, block_size=4, reserve_new_tokens=0)
    old, new = make_seq(0, prompt_len=4), make_seq(1, prompt_len=2)
    scheduler.add(old)
    scheduler.add(new)
    first = launch(scheduler)  # one block each
    ahead = scheduler.schedule(0.0, ahead=True)  # old's next token needs a second block: it waits
    assert [item.seq for item in ahead.scheduled] == [new] and not ahead.preempted
    assert ahead.starved and not scheduler.may_look_ahead(ahead)  # the plan after it waits for the results
    scheduler.launch(ahead)
    scheduler.update(first, samples([5, 6]), 0.0)
    scheduler.update(ahead, samples([7]), 0.0)
    assert new.output_ids == [6, 7] and old.output_ids == [5]
    plan, _ = run_step(scheduler)  # planned after the results, old may preempt new
    assert [item.seq for item in plan.scheduled] == [old] and plan.preempted == [new]


def test_only_sequences_that_go_on_alone_let_the_next_plan_be_made_ahead():
    scheduler = make_scheduler()
    seq = make_seq(0, prompt_len=4)
    seq.params = SamplingParams(max_new_tokens=8, n=2, do_sample=True)
    seq.pending_forks = 1
    scheduler.add(seq)
    plan = launch(scheduler)
    assert not scheduler.may_look_ahead(plan)  # its first token forks a second sample
    assert seq.num_pending == 0  # forks are made when the tokens are in
    scheduler.update(plan, samples([5, 6]), 0.0)
    plan = launch(scheduler)
    assert scheduler.may_look_ahead(plan)
    plan.scheduled[0].draft_ids = [3]
    assert not scheduler.may_look_ahead(plan)
    plan.scheduled[0].draft_ids = []
    seq.matcher = object()  # a structured-output constraint: its next mask follows the step (masks_follow)
    assert scheduler.may_look_ahead(plan)
