"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

`schedule(now)` returns a StepPlan and `update(plan, sampled_ids)` takes back
what the step produced. No I/O, no tensors.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from llmserve.common.config import SchedulerConfig
from llmserve.master.block_manager import BlockManager
from llmserve.master.groups import BeamGroup, GroupChange, fork_samples
from llmserve.master.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprobs
from llmserve.master.speculative import Speculator
from llmserve.master.structured import constrained_drafts


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: `num_new_tokens` tokens starting at its `num_computed`."""

    seq: Sequence
    num_new_tokens: int
    samples: bool  # this chunk reaches the last known token, so a next token is drawn
    num_samples: int = 1  # sampled rows: 1, or n / best_of at a request's first token
    is_prefill: bool = False
    num_scored: int = 0  # prompt positions from `first_scored` whose next token's log-probability is returned
    first_scored: int = 0
    draft_ids: list[int] = field(default_factory=list)  # proposed tokens verified after the last one (speculation)
    propose_count: int = 0  # tokens the agent's draft model proposes after this step; SKIP_DRAFT_MODEL: it
    # does not even read this sequence's tokens (it never speculates, or its proposals pause)
    computed_end: int = 0  # the sequence's tokens with KV once this step ran (set when it is sent)

    @property
    def num_rows(self) -> int:
        """Rows sampled: one per sample, or with proposed tokens one per position verified."""
        if not self.samples:
            return 0
        return 1 + len(self.draft_ids) if self.draft_ids else self.num_samples


@dataclass
class StepPlan:
    """What the next step runs."""

    scheduled: list[ScheduledSeq]
    num_tokens: int
    num_prefill_seqs: int
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the step runs
    released: list[int] = field(default_factory=list)  # sequences whose tables the agents may drop first
    launched: bool = False  # Scheduler.launch applied it
    starved: bool = False  # made ahead, it left out a running sequence short of blocks (the next plan may preempt)

    @property
    def is_decode_only(self) -> bool:
        return self.num_prefill_seqs == 0


@dataclass
class StepOutcome:
    """What `update` learned from a step's sampled tokens."""

    new_tokens: list[tuple[Sequence, int]]
    finished: list[Sequence]
    forked: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (parent, new sequence)
    num_accepted: int = 0  # proposed tokens accepted (speculation)
    num_dropped: int = 0  # tokens past a stop string found inside an accepted run (the engine cuts them)


@dataclass
class StepSamples:
    """What the agent returned for a step's sampled rows."""

    ids: np.ndarray  # [rows]
    logprobs: Optional[np.ndarray] = None  # [rows] raw log-probability of each id
    topk_ids: Optional[np.ndarray] = None  # [rows, width]
    topk_logprobs: Optional[np.ndarray] = None
    prompt: Optional["PromptScores"] = None  # the scored prompt positions, in plan order
    draft_ids: Optional[np.ndarray] = None  # [sequences, width]: the agent's draft model's proposals, in plan order

    def token_logprobs(self, row: int, num_top: int) -> Optional[TokenLogprobs]:
        if num_top < 0 or self.logprobs is None:
            return None
        top = [] if num_top == 0 else list(zip(self.topk_ids[row, :num_top].tolist(), self.topk_logprobs[row, :num_top].tolist()))
        return TokenLogprobs(float(self.logprobs[row]), top)


@dataclass
class PromptScores:
    """What the agent returned for a step's scored prompt positions: each next prompt token's raw
    log-probability, its rank and the top alternatives."""

    logprobs: np.ndarray  # [positions]
    ranks: np.ndarray
    topk_ids: np.ndarray  # [positions, width]
    topk_logprobs: np.ndarray

    def token_logprobs(self, first: int, count: int, num_top: int) -> list[TokenLogprobs]:
        """Scored positions first.. first + count - 1."""
        rows = slice(first, first + count)
        tops = (zip(ids[:num_top], lps[:num_top]) for ids, lps in
                zip(self.topk_ids[rows].tolist(), self.topk_logprobs[rows].tolist()))
        return [TokenLogprobs(logprob, list(top), rank)
                for logprob, rank, top in zip(self.logprobs[rows].tolist(), self.ranks[rows].tolist(), tops)]


SKIP_DRAFT_MODEL = -1
RESUME_RESERVE = 4  # a resumed sequence reserves this many times reserve_new_tokens (at least a block's worth)


def _unplan(plan: StepPlan, seq: Sequence) -> None:
    """Take a sequence about to be preempted back out of the plan, with the block copies into its blocks."""
    plan.block_copies = [(src, dst) for src, dst in plan.block_copies if dst not in seq.block_ids]
    for item in plan.scheduled:
        if item.seq is seq:
            plan.scheduled.remove(item)
            plan.num_tokens -= item.num_new_tokens
            plan.num_prefill_seqs -= item.is_prefill
            return


class Scheduler:
    """Keeps the waiting and running queues and decides every step."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, next_seq_id: Optional[Callable[[], int]] = None,
                 speculator: Optional[Speculator] = None):
        """`speculator`: propose tokens for decode steps to verify (speculative decoding)."""
        self.config = config
        self.blocks = block_manager
        self.speculator = speculator
        self.next_seq_id = next_seq_id or itertools.count(1 << 48).__next__  # ids of forked sequences
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

    def schedule(self, now: float, ahead: bool = False) -> Optional[StepPlan]:
        """Plan the next step, or None when nothing should run yet.

        `ahead`: the step before is still in flight (overlapped scheduling, when `may_look_ahead` allowed it).
        Its sequences count the tokens it samples as pending; one whose pending token is its last is left
        out, and nothing is preempted (the pending tokens would be lost): a sequence that cannot grow waits,
        nothing new is admitted, and the plan after this one is made once the step before is back."""
        plan = StepPlan(scheduled=[], num_tokens=0, num_prefill_seqs=0)
        self._schedule_running(plan, ahead)
        if not plan.preempted and not plan.starved and self._may_admit(now):
            self._admit_waiting(plan, now)
        if not plan.scheduled and self.waiting and not ahead and self._all_running_await_siblings():
            self._unblock(plan, now)
        if not plan.scheduled:
            return None
        if plan.is_decode_only and not (plan.preempted or plan.block_copies) and self._should_wait_for_decode_batch(now):
            return None
        plan.released = self.blocks.take_released()
        return plan

    def may_look_ahead(self, plan: StepPlan) -> bool:
        """Whether the next step may be planned while `plan`'s step is in flight: every sequence it samples
        goes on by itself with one token (no proposals to verify or to use next, no beams, no forks of n
        samples), none would get proposals in the next step, and `plan` left no sequence short of blocks. A
        constrained sequence may go on: its next mask follows the step (StepRequest.masks_follow)."""
        if plan.starved:
            return False
        for item in plan.scheduled:
            if not item.samples:
                continue
            seq = item.seq
            if item.draft_ids or item.propose_count > 0 or seq.beam is not None or item.num_samples > 1:
                return False
            if self._would_propose(seq):
                return False
        return True

    def _would_propose(self, seq: Sequence) -> bool:
        """The next plan would ask the speculator for `seq`'s proposals."""
        speculator = self.speculator
        return (speculator is not None and self._speculates(seq) and speculator.wants_batch(len(self.running))
                and not speculator.pauses(seq.seq_id))

    @staticmethod
    def _speculates(seq: Sequence) -> bool:
        """`seq` may get proposals at all: not a beam, and its request did not switch speculation off. A
        constrained sequence gets those its grammar allows, and a mask per verified position."""
        return seq.beam is None and seq.params.speculative

    def launch(self, plan: StepPlan) -> None:
        """`plan`'s step is on its way to the agents: the KV of its tokens counts as computed, and the token
        sampled for each sequence that goes on by itself (one row, no proposals, no beam) is pending, held by
        a placeholder naming its row, -1 - row, until `update`."""
        plan.launched = True
        row = 0
        for item in plan.scheduled:
            seq, first_row = item.seq, row
            row += item.num_rows
            if item.draft_ids:  # the verification decides what is computed
                continue
            seq.num_computed += item.num_new_tokens
            item.computed_end = seq.num_computed
            if item.samples and item.num_samples == 1 and seq.beam is None and seq.params.max_new_tokens:
                seq.add_pending(-1 - first_row)

    def pass_drafts(self, plan: StepPlan) -> None:
        """A plan made ahead gets no proposals: each sequence's pause in proposing counts the step, and an
        agent's draft model reads the tokens of those whose proposals do not pause."""
        speculator = self.speculator
        if speculator is None:
            return
        uses_draft_model = speculator.config.method == "draft"
        for item in plan.scheduled:
            seq = item.seq
            speculates = self._speculates(seq)
            if speculates and item.samples and not item.is_prefill:
                speculator.pass_step(seq.seq_id)
            if uses_draft_model and (not speculates or speculator.is_paused(seq.seq_id)):
                item.propose_count = SKIP_DRAFT_MODEL

    def add_drafts(self, plan: StepPlan) -> None:
        """With a speculator: give the decode rows of `plan` proposed tokens to verify, within the step's token
        budget and sampled rows (1 + k per decode slot), each sequence's remaining tokens and the free blocks
        (never preempting for them); with a draft model, also ask the agent for each sampling row's proposals
        for the next step, with blocks for the positions the draft writes them at."""
        if self.speculator is None or not self.speculator.wants_batch(len(self.running)):
            return
        budget = self.config.max_num_batched_tokens - plan.num_tokens
        rows = sum(item.num_rows for item in plan.scheduled)
        max_rows = self.config.decode_batch_size * self.speculator.config.rows_per_seq
        uses_draft_model = self.speculator.config.method == "draft"
        for item in plan.scheduled:
            seq = item.seq
            if not self._speculates(seq):
                item.propose_count = SKIP_DRAFT_MODEL if uses_draft_model else 0
                continue
            skips_draft_model = uses_draft_model and self.speculator.is_paused(seq.seq_id)
            if skips_draft_model:
                item.propose_count = SKIP_DRAFT_MODEL
            if not item.samples or item.num_samples > 1:
                continue
            room = min(budget, max_rows - rows, seq.num_tokens_left - 1)
            if not item.is_prefill and room > 0:
                drafts = self.speculator.propose(seq.seq_id, seq.token_ids, room, len(self.running))
                if seq.matcher is not None:  # structured output: what the grammar forces, or allows
                    most = min(room, self.speculator.config.num_speculative_tokens)
                    drafts = constrained_drafts(seq.matcher, drafts, most, seq.eos_token_ids)
                while drafts and not self.blocks.can_grow(seq, seq.num_tokens + len(drafts)):
                    drafts.pop()
                if drafts:
                    plan.block_copies.extend(self.blocks.grow(seq, seq.num_tokens + len(drafts)))
                    item.draft_ids = drafts
                    item.num_new_tokens += len(drafts)
                    plan.num_tokens += len(drafts)
                    budget -= len(drafts)
                    rows += len(drafts)
            if uses_draft_model and not skips_draft_model:
                self._ask_draft_model(item)

    def _ask_draft_model(self, item: ScheduledSeq) -> None:
        """The agent's draft model proposes up to this many tokens after the step: it writes its KV at the
        positions of the new token and of all but the last proposal, so they get blocks now (returned after
        the step with the rejected ones')."""
        seq = item.seq  # at most what the next step could verify, and the draft writes below max_seq_len
        room = max(0, seq.num_tokens_left - 2 - len(item.draft_ids))
        count = self.speculator.next_draft_length(seq.seq_id, room, len(self.running)) if room else 0
        end = seq.num_computed + item.num_new_tokens + count
        while count and not self.blocks.can_grow(seq, end):
            count, end = count - 1, end - 1
        if count:
            item.propose_count = count
            self.blocks.grow(seq, end)  # past the tokens written now: nothing shared to copy

    def _schedule_running(self, plan: StepPlan, ahead: bool = False) -> None:
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if plan.num_tokens >= budget:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed == 0:
                continue  # preempted for an older sequence, or a beam waiting for its siblings' candidates
            if seq.num_pending and seq.num_tokens_left == 0:
                continue  # its pending token is its last
            num_new = min(seq.num_uncomputed, budget - plan.num_tokens)
            if self._make_room(seq, seq.num_computed + num_new, plan, may_preempt=not ahead):
                self._add_to_plan(plan, seq, num_new, is_prefill=seq.num_uncomputed > 1)
            elif ahead:
                plan.starved = True

    def _make_room(self, seq: Sequence, num_tokens: int, plan: StepPlan, may_preempt: bool = True) -> bool:
        """Preempt running sequences until `seq` can grow; False if `seq` was the one (or may not grow now)."""
        while not self.blocks.can_grow(seq, num_tokens):
            if not may_preempt or self._preempt_victim(plan) is seq:
                return False
        plan.block_copies.extend(self.blocks.grow(seq, num_tokens))
        return True

    def _preempt_victim(self, plan: StepPlan) -> Sequence:
        """Preempt the newest running sequence never preempted before, else the newest (a resumed sequence goes
        on while another can make room, so no request is preempted again and again); take it out of `plan`."""
        victim = next((seq for seq in reversed(self.running) if seq.num_preemptions == 0), self.running[-1])
        _unplan(plan, victim)
        self._preempt(victim)
        plan.preempted.append(victim)
        return victim

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and queue it first in line to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.drop_pending()
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if seq.beam is not None:
            seq.beam.drop(seq)
        self.waiting.appendleft(seq)

    def _may_admit(self, now: float) -> bool:
        if not self.waiting:
            return False
        if self.config.batching_strategy == "static" and self.running:
            return False
        if len(self.waiting) >= self.config.prefill_batch_size:
            return True
        return now - self.waiting[0].arrival_time >= self.config.batch_waiting_time

    def _admit_waiting(self, plan: StepPlan, now: float) -> None:
        while self.waiting and self._admit(self.waiting[0], plan, now):
            pass

    def _admit(self, seq: Sequence, plan: StepPlan, now: float) -> bool:
        """Start (or resume) waiting `seq` in this step if the budgets, its blocks and the running sequences'
        growth allow; whether it was."""
        budget = self.config.max_num_batched_tokens
        if plan.num_tokens >= budget or plan.num_prefill_seqs >= self.config.prefill_batch_size:
            return False
        if self.num_slots + seq.num_slots > self.config.decode_batch_size:
            return False
        cached = self.blocks.lookup(seq)  # a waiting sequence holds no blocks: new, or preempted
        num_computed = len(cached) * self.blocks.block_size
        num_new = min(seq.num_tokens - num_computed, budget - plan.num_tokens)
        if num_computed + num_new < seq.num_tokens and not self._may_chunk(seq):
            return False
        num_taken = self.blocks.num_needed(cached, num_computed + num_new)
        if num_taken > self.blocks.num_free_blocks:
            return False
        num_held = self.blocks.blocks_for(num_computed + num_new)
        if self._must_reserve(seq) and not self._leaves_room_to_grow(seq, num_held, num_taken):
            return False
        self.waiting.remove(seq)
        self.blocks.start_from_cache(seq, cached)
        plan.block_copies.extend(self.blocks.grow(seq, seq.num_computed + num_new))
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = now
        self.running.append(seq)
        self._add_to_plan(plan, seq, num_new, is_prefill=True)
        return True

    def _unblock(self, plan: StepPlan, now: float) -> None:
        """Every running sequence is a beam waiting for a preempted sibling that cannot be admitted in turn:
        admit such siblings out of turn, and where their blocks do not fit, preempt running beams to free some."""
        while self._all_running_await_siblings():
            if any(self._admit(seq, plan, now) for seq in list(self.waiting) if self._is_awaited(seq)):
                return
            self._preempt_victim(plan)
        self._admit_waiting(plan, now)  # every beam was preempted: the queue's head goes first again

    def _all_running_await_siblings(self) -> bool:
        return bool(self.running) and all(seq.num_uncomputed == 0 for seq in self.running)

    @staticmethod
    def _is_awaited(seq: Sequence) -> bool:
        """A preempted beam whose running siblings wait for it."""
        return seq.beam is not None and any(beam.status is SequenceStatus.RUNNING for beam in seq.beam.beams)

    def _must_reserve(self, seq: Sequence) -> bool:
        """Admission checks growth unless nothing runs, or `seq` is a preempted beam its running siblings wait
        for (they cannot go on, or give their blocks back, until it is computed)."""
        return bool(self.running) and not self._is_awaited(seq)

    def _leaves_room_to_grow(self, seq: Sequence, num_held: int, num_taken: int) -> bool:
        """Admitting `seq` (then holding `num_held` blocks, `num_taken` of them from the free queue) leaves room
        for the reserved growth of it and of every running sequence, as each adds a token per step and frees
        its own blocks when done: the projected need peaks just before one of them ends."""
        seqs = self.running + [seq]
        reserved, ends = (np.array(values) for values in zip(*(self._reservation(s) for s in seqs)))
        tokens = np.array([s.num_tokens for s in seqs])
        held = np.array([len(s.block_ids) for s in self.running] + [num_held])
        slots = np.array([s.num_slots for s in seqs])
        size, free = self.blocks.block_size, self.blocks.num_free_blocks - num_taken
        copies = (slots - 1) * (tokens % size != 0)  # each further sample or beam copies the shared last block
        growth = np.maximum(-(-(tokens + reserved) // size) - held, 0) * slots + copies
        if growth.sum() <= free:  # fits even if none of them ended: the usual case, O(sequences)
            return True
        own = np.array([self.blocks.num_exclusive(s) for s in self.running] + [num_taken])
        times = reserved[:, None]  # [time, 1]: the last step of each sequence's reservation
        grown = -(-(tokens + np.minimum(times, reserved)) // size)  # [time, seq] blocks held then
        alive = (times <= reserved) | ~ends
        extra = np.where(alive, np.maximum(grown - held, 0) * slots + copies, -own)
        return int(extra.sum(axis=1).max()) <= free

    def _reservation(self, seq: Sequence) -> tuple[int, bool]:
        """New tokens admission keeps room for, and whether that is all `seq` may still generate: up to
        reserve_new_tokens, or RESUME_RESERVE times that for a sequence preempted before."""
        rest = max(0, min(seq.params.max_new_tokens - seq.num_output_tokens, seq.max_seq_len - seq.num_tokens))
        reserve = self.config.reserve_new_tokens
        if seq.num_preemptions:
            reserve = RESUME_RESERVE * max(reserve, self.blocks.block_size)
        return (rest, True) if rest <= reserve else (reserve, False)

    def _may_chunk(self, seq: Sequence) -> bool:
        """Chunked prefill is on, or `seq` (a long prompt, or a preempted one with its outputs) never fits one step."""
        return self.config.enable_chunked_prefill or seq.num_uncomputed > self.config.max_num_batched_tokens

    def _add_to_plan(self, plan: StepPlan, seq: Sequence, num_new: int, is_prefill: bool) -> None:
        samples = seq.num_computed + num_new == seq.num_tokens
        item = ScheduledSeq(seq, num_new, samples, 1 + seq.pending_forks, is_prefill)
        if seq.num_prompt_positions_to_score:
            item.first_scored = max(seq.num_computed, len(seq.prompt_logprobs))
            item.num_scored = max(0, min(seq.num_computed + num_new, seq.num_prompt_tokens - 1) - item.first_scored)
        plan.scheduled.append(item)
        plan.num_tokens += num_new
        plan.num_prefill_seqs += is_prefill

    @property
    def num_slots(self) -> int:
        """Decode slots the running sequences hold, counting samples and beams still to come."""
        return sum(seq.num_slots for seq in self.running)

    def _should_wait_for_decode_batch(self, now: float) -> bool:
        wait = self.config.decode_batch_waiting_time
        if wait <= 0 or len(self.running) >= self.config.decode_batch_size:
            return False
        return now - self.last_step_time < wait

    def update(self, plan: StepPlan, samples: StepSamples, now: float) -> StepOutcome:
        """Apply a finished step (launching its plan first if no one did): settle its computed counts, append
        tokens; samples and beams act as groups."""
        if not plan.launched:
            self.launch(plan)
        self.last_step_time = now
        outcome = StepOutcome(new_tokens=[], finished=[])
        beam_groups: list[BeamGroup] = []
        row = scored = 0
        for index, item in enumerate(plan.scheduled):
            seq, first_row, first_scored = item.seq, row, scored
            row += item.num_rows
            scored += item.num_scored
            if seq.is_finished or seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            if item.num_scored:
                seq.prompt_logprobs += samples.prompt.token_logprobs(first_scored, item.num_scored, seq.params.prompt_logprobs)
            if item.draft_ids:
                self._verify(item, samples, first_row, outcome)
            else:  # its computed count moved when the step was sent; what it computed is now in the cache
                self.blocks.cache_computed(seq, item.computed_end)
                if not item.samples:
                    continue
                if seq.beam is not None:
                    seq.beam.collect(seq, samples.topk_ids[first_row], samples.topk_logprobs[first_row])
                    beam_groups += [seq.beam] if seq.beam not in beam_groups else []
                    continue
                children = fork_samples(seq, self.blocks, self.next_seq_id) if seq.pending_forks else []
                self._apply(GroupChange(forked=[(seq, child) for child in children]), outcome)
                for offset, target in enumerate([seq, *children]):
                    self._append(target, samples, first_row + offset, outcome)
            if item.propose_count > 0 and not seq.is_finished:
                self._keep_proposals(seq, samples.draft_ids[index, : item.propose_count])
        for group in beam_groups:
            if group.is_ready:
                self._apply(group.advance(self.blocks, self.next_seq_id), outcome)
        return outcome

    def _verify(self, item: ScheduledSeq, samples: StepSamples, first_row: int, outcome: StepOutcome) -> None:
        """Keep the proposed tokens the rows' samples accept, then the first row's sample that differs (or the
        bonus row's); the KV of rejected positions stays uncomputed and blocks past the tokens are returned."""
        seq, drafts = item.seq, item.draft_ids
        sampled = samples.ids[first_row : first_row + len(drafts) + 1].tolist()
        accepted = self.speculator.verify(seq.seq_id, drafts, sampled)
        outcome.num_accepted += accepted
        seq.num_computed += 1  # the last token's KV; each accepted proposal's follows below
        for offset in range(accepted + 1):
            if not self._append(seq, samples, first_row + offset, outcome):
                return  # finished: its blocks are freed
            seq.num_computed += offset < accepted
        self.blocks.cache_computed(seq)
        self.blocks.shrink(seq, seq.num_tokens)

    def _keep_proposals(self, seq: Sequence, proposed: np.ndarray) -> None:
        """The draft model's proposals for the next step (-1 past those it made); the blocks it wrote them
        in, past the sequence's tokens, go back."""
        self.speculator.keep_agent_drafts(seq.seq_id, seq.num_tokens, [int(t) for t in proposed if t >= 0])
        self.blocks.shrink(seq, seq.num_tokens)

    def _append(self, seq: Sequence, samples: StepSamples, row: int, outcome: StepOutcome) -> bool:
        """Add row `row`'s token to `seq`; whether it goes on."""
        token_id = int(samples.ids[row])
        reason = seq.append_token(token_id, samples.token_logprobs(row, seq.params.agent_num_logprobs))
        outcome.new_tokens.append((seq, token_id))
        if reason is not None:
            self.running.remove(seq)
            self._finish(seq, reason)
            outcome.finished.append(seq)
        return reason is None

    def _apply(self, change: GroupChange, outcome: StepOutcome) -> None:
        """A group's forks join the running sequences and its finished beams leave them."""
        self.running += [child for _, child in change.forked]
        for seq in change.finished:
            self.running.remove(seq)
        outcome.forked += change.forked
        outcome.new_tokens += change.new_tokens
        outcome.finished += change.finished

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.blocks.free(seq)
        seq.drop_pending()
        if self.speculator is not None:
            self.speculator.forget(seq.seq_id)
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
