"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

`schedule(now)` returns a StepPlan and `update(plan, sampled_ids)` takes back
what the step produced. No I/O, no tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

from common.config import SchedulerConfig
from master.block_manager import BlockManager
from master.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: `num_new_tokens` tokens starting at its `num_computed`."""

    seq: Sequence
    num_new_tokens: int
    samples: bool  # this chunk reaches the last known token, so a next token is drawn


@dataclass
class StepPlan:
    """What the next step runs."""

    scheduled: list[ScheduledSeq]
    num_tokens: int
    num_prefill_seqs: int
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_decode_only(self) -> bool:
        return self.num_prefill_seqs == 0


@dataclass
class StepOutcome:
    """What `update` learned from a step's sampled tokens."""

    new_tokens: list[tuple[Sequence, int]]
    finished: list[Sequence]


class Scheduler:
    """Keeps the waiting and running queues and decides every step."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.last_step_time = 0.0
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence, reason: FinishReason = FinishReason.ABORT) -> None:
        """Drop `seq` wherever it is and return its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._finish(seq, reason)

    def next_wakeup(self, now: float) -> Optional[float]:
        """When a deferred step becomes due, if `schedule` declined to run one."""
        times = []
        if self.waiting:
            times.append(self.waiting[0].arrival_time + self.config.batch_waiting_time)
        if self.running:
            times.append(self.last_step_time + self.config.decode_batch_waiting_time)
        return min(times) if times else None

    def schedule(self, now: float) -> Optional[StepPlan]:
        """Plan the next step, or None when nothing should run yet."""
        plan = StepPlan(scheduled=[], num_tokens=0, num_prefill_seqs=0)
        self._schedule_running(plan)
        if not plan.preempted and self._may_admit(now):
            self._admit_waiting(plan)
        if not plan.scheduled:
            return None
        if plan.is_decode_only and not plan.preempted and self._should_wait_for_decode_batch(now):
            return None
        return plan

    def _schedule_running(self, plan: StepPlan) -> None:
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and plan.num_tokens < budget:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed, budget - plan.num_tokens)
            if not self._make_room(seq, seq.num_computed + num_new, plan):
                break  # seq itself was preempted; it was the newest, so nothing is left after it
            self._add_to_plan(plan, seq, num_new, is_prefill=seq.num_uncomputed > 1)
            i += 1

    def _make_room(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Preempt the newest running sequences until `seq` can grow; False if `seq` was the one."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and queue it first in line to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _may_admit(self, now: float) -> bool:
        if not self.waiting:
            return False
        if self.config.batching_strategy == "static" and self.running:
            return False
        if len(self.waiting) >= self.config.prefill_batch_size:
            return True
        return now - self.waiting[0].arrival_time >= self.config.batch_waiting_time

    def _admit_waiting(self, plan: StepPlan) -> None:
        budget = self.config.max_num_batched_tokens
        while self.waiting and plan.num_tokens < budget:
            if len(self.running) >= self.config.decode_batch_size:
                break
            if plan.num_prefill_seqs >= self.config.prefill_batch_size:
                break
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed, budget - plan.num_tokens)
            if num_new < seq.num_uncomputed and not self._may_chunk(seq):
                break
            if not self.blocks.can_grow(seq, seq.num_computed + num_new):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_computed + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_to_plan(plan, seq, num_new, is_prefill=True)

    def _may_chunk(self, seq: Sequence) -> bool:
        """Chunked prefill is on, or `seq` (a long prompt, or a preempted one with its outputs) never fits one step."""
        return self.config.enable_chunked_prefill or seq.num_uncomputed > self.config.max_num_batched_tokens

    def _add_to_plan(self, plan: StepPlan, seq: Sequence, num_new: int, is_prefill: bool) -> None:
        samples = seq.num_computed + num_new == seq.num_tokens
        plan.scheduled.append(ScheduledSeq(seq, num_new, samples))
        plan.num_tokens += num_new
        plan.num_prefill_seqs += is_prefill

    def _should_wait_for_decode_batch(self, now: float) -> bool:
        wait = self.config.decode_batch_waiting_time
        if wait <= 0 or len(self.running) >= self.config.decode_batch_size:
            return False
        return now - self.last_step_time < wait

    def update(self, plan: StepPlan, sampled_ids: Seq[int], now: float) -> StepOutcome:
        """Apply a finished step: advance computed counts, append tokens, finish sequences."""
        self.last_step_time = now
        outcome = StepOutcome(new_tokens=[], finished=[])
        sample_row = 0
        for item in plan.scheduled:
            seq = item.seq
            if item.samples:
                token_id = int(sampled_ids[sample_row])
                sample_row += 1
            if seq.is_finished or seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed += item.num_new_tokens
            if not item.samples:
                continue
            reason = seq.append_token(token_id)
            outcome.new_tokens.append((seq, token_id))
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                outcome.finished.append(seq)
        return outcome

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def fail_all(self, reason: FinishReason = FinishReason.ERROR) -> list[Sequence]:
        """Finish every unfinished sequence (an agent died); return them."""
        victims = list(self.running) + list(self.waiting)
        self.running.clear()
        self.waiting.clear()
        for seq in victims:
            self._finish(seq, reason)
        return victims
