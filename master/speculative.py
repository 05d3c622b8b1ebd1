"""Speculative decoding: propose a sequence's next tokens cheaply, verify them all in one step of the model.

A decode step of a sequence with proposed tokens d1..dk feeds the model its last token and d1..dk, and
samples a row at each of the k+1 positions, exactly as plain decoding samples the token after that prefix
(same penalties, suppressed ids, seed offsets). Token i is accepted while it equals the row's sample; the
first row that differs gives the next token instead, and when all k match, the last row gives a bonus one.
A proposal is a deterministic function of the tokens so far (q one-hot in the terms of speculative
sampling), so this is rejection sampling: d is accepted with probability p(d), a rejection draws from p
without d, renormalised. Every token comes from the target's distribution given the tokens before it, and
a seeded request draws the same noise at each position as without speculation: the outputs are the ones
plain decoding gives, token for token, greedy or sampled.

KV entries written for rejected positions are left behind: the sequence's computed count stops at its
accepted tokens, the next step overwrites them, and whole blocks past its tokens go back to the pool.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from llmserve.common.config import SpeculativeConfig

MAX_BACKOFF_STEPS = 64  # the longest pause in proposing for a sequence whose proposals do not pay
MAX_MISS_PAUSE = 4  # the longest pause in looking for n-gram matches after looking found none
DECAY = 0.8  # weight of the acceptance seen before each verification
DRAFT_MODEL_COST = 0.15  # a draft model's pass per proposed token, as a share of a step, until measured
PRIOR_ACCEPTED, PRIOR_ATTEMPTS = 1.0, 1.5  # a new sequence starts as if 2 of 3 proposed tokens were accepted


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    prompt_lookup_max down to prompt_lookup_min) and propose what followed it. When the match is close
    enough that its continuation runs into the suffix itself (a loop of period p < k), the loop repeats."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def __call__(self, tokens: np.ndarray, k: int) -> list[int]:
        """Up to `k` proposed next tokens of the sequence `tokens` (int64)."""
        length = len(tokens)
        if length <= self.min_n or k <= 0:
            return []
        # candidate ends: earlier positions holding the last token; grow the match backwards from each
        ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
        if len(ends) == 0:
            return []
        matched = np.ones(len(ends), dtype=np.int64)
        alive = np.ones(len(ends), dtype=bool)
        for back in range(1, min(self.max_n, length - 1)):
            starts = ends - back
            alive &= starts >= 0
            alive[alive] = tokens[starts[alive]] == tokens[length - 1 - back]
            if not alive.any():
                break
            matched += alive
        best = int(matched.max())
        if best < self.min_n:
            return []
        end = int(ends[np.flatnonzero(matched == best)[-1]])  # the latest of the longest matches
        period = length - 1 - end
        return tokens[end + 1 + np.arange(k) % period].tolist()


@dataclass
class SpecState:
    """One sequence's speculation: its tokens as an array (for the proposer), its acceptance so far (decayed
    counts), and how long proposing pauses while proposals do not pay."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    num_tokens: int = 0
    accepted: float = PRIOR_ACCEPTED  # proposed tokens accepted, decayed by DECAY per verification
    attempts: float = PRIOR_ATTEMPTS  # accepted ones, plus one per verification that rejected one
    pause: int = 0  # steps left without proposing
    num_pauses: int = 0  # pauses since a proposed token was last accepted (each twice as long)
    num_misses: int = 0  # n-gram lookups in a row that found no match
    probe: bool = False  # a pause just ended: propose one token, whatever the rate says

    @property
    def rate(self) -> float:
        """The chance that a proposed token is accepted, given the ones before it were."""
        return self.accepted / self.attempts

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """The sequence's tokens as an array, appending only those added since the last call."""
        count = len(token_ids)
        if count < self.num_tokens:  # cut back (a stop string): start over
            self.num_tokens = 0
        if count > len(self.tokens):
            self.tokens = np.concatenate([self.tokens, np.zeros(max(count, len(self.tokens)), dtype=np.int64)])
        if count > self.num_tokens:
            self.tokens[self.num_tokens : count] = token_ids[self.num_tokens : count]
            self.num_tokens = count
        return self.tokens[:count]


Proposer = Callable[[np.ndarray, int], list[int]]


def best_draft_length(rate: float, cost: float, k_max: int) -> int:
    """The k in 0..k_max with the most expected tokens per step time: (1 + rate + ... + rate^k) / (1 + cost k)."""
    best_k, best, expected = 0, 1.0, 1.0
    for k in range(1, k_max + 1):
        expected += rate ** k
        gain = expected / (1 + cost * k)
        if gain > best:
            best_k, best = k, gain
    return best_k


class Speculator:
    """Proposes tokens for decode steps, judges the verifications, adapts each sequence's draft length,
    and counts drafts and acceptances (the llmserve_spec_decode_* metrics)."""

    def __init__(self, config: SpeculativeConfig, proposer: Optional[Proposer] = None):
        self.config = config
        self.proposer = proposer or NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.states: dict[int, SpecState] = {}  # seq id -> its state
        self.agent_drafts: dict[int, tuple[int, list[int]]] = {}  # seq id -> (its length then, the draft's proposals)
        self.draft_model_cost = DRAFT_MODEL_COST if config.method == "draft" else 0.0  # per token, share of a step
        self.num_drafts = 0  # verifications of at least one proposed token
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * config.num_speculative_tokens  # drafts whose token i was accepted

    def wants_batch(self, num_running: int) -> bool:
        """Whether to propose at all with `num_running` sequences running (speculative_config.disable_by_batch_size)."""
        limit = self.config.disable_by_batch_size
        return not limit or num_running < limit

    def propose(self, seq_id: int, token_ids: list[int], room: int, num_running: int = 1) -> list[int]:
        """At most `room` tokens proposed to follow `token_ids`, with `num_running` sequences in the batch: the
        n-gram proposer's, or what the agent's draft model proposed after the last step.

        Adaptive (speculative_config.adaptive): the draft length k maximises the expected tokens per unit of
        step time, (1 + a + ... + a^k) / (1 + c k), with a the sequence's acceptance rate and c what a proposed
        token costs relative to a step: draft_token_cost per running sequence to verify it (the more rows a
        step has, the closer it is to compute-bound, where every row costs its share), plus a draft model's
        measured time to propose it. When no k > 0 pays, proposing pauses for 2, 4, ... MAX_BACKOFF_STEPS
        steps, then a single token probes again. An n-gram lookup that finds no match pauses 1, 2, then
        MAX_MISS_PAUSE steps (a paused sequence lets overlapped scheduling plan its steps ahead)."""
        state = self._state(seq_id)
        if state.pause:
            state.pause -= 1
            return []
        k = self._length(state, num_running)
        if not k and not state.probe:
            state.num_pauses += 1
            state.pause, state.probe = min(2 ** state.num_pauses, MAX_BACKOFF_STEPS) - 1, True
            return []
        k, state.probe = min(max(k, 1), room), False
        if self.config.method == "draft":
            num_tokens, drafts = self.agent_drafts.pop(seq_id, (-1, []))
            return drafts[:k] if num_tokens == len(token_ids) else []
        drafts = self.proposer(state.sync(token_ids), k)[:k]
        state.num_misses = 0 if drafts else state.num_misses + 1
        if not drafts:
            state.pause = min(2 ** (state.num_misses - 1), MAX_MISS_PAUSE)
        return drafts

    def is_paused(self, seq_id: int) -> bool:
        """Proposing pauses for this sequence past the next step (a draft model need not read its tokens: its
        KV for them stays stale, which lowers the acceptance later, never the output)."""
        state = self.states.get(seq_id)
        return state is not None and state.pause > 1

    def pauses(self, seq_id: int) -> bool:
        """The next `propose` for this sequence returns nothing, as its proposals pause."""
        state = self.states.get(seq_id)
        return state is not None and state.pause > 0

    def pass_step(self, seq_id: int) -> None:
        """A step without proposals for this sequence (planned ahead, while the one before was in flight): it
        counts towards a pause as a `propose` would."""
        state = self.states.get(seq_id)
        if state is not None and state.pause:
            state.pause -= 1

    def next_draft_length(self, seq_id: int, room: int, num_running: int) -> int:
        """How many tokens the agent's draft model should propose after this step (without changing the state)."""
        state = self._state(seq_id)
        if state.pause > 1:
            return 0
        return min(max(self._length(state, num_running), 1), room)

    def keep_agent_drafts(self, seq_id: int, num_tokens: int, drafts: list[int]) -> None:
        """The draft model's proposals to follow the sequence's first `num_tokens` tokens (its next step's)."""
        self.agent_drafts[seq_id] = (num_tokens, drafts)

    def _state(self, seq_id: int) -> SpecState:
        state = self.states.get(seq_id)
        if state is None:
            state = self.states[seq_id] = SpecState()
        return state

    def _length(self, state: SpecState, num_running: int) -> int:
        k = self.config.num_speculative_tokens
        if not self.config.adaptive:
            return k
        cost = self.config.draft_token_cost * num_running + self.draft_model_cost
        return best_draft_length(state.rate, min(1.0, cost), k)

    def observe_draft_model(self, draft_ms: float, num_proposed: int, step_ms: float) -> None:
        """A step's draft-model time: what proposing one token costs relative to a step (a decayed mean), added
        to the cost of verifying it."""
        if num_proposed > 0 and step_ms > 0:
            share = draft_ms / num_proposed / step_ms
            self.draft_model_cost = DECAY * self.draft_model_cost + (1 - DECAY) * share

    def verify(self, seq_id: int, drafts: list[int], sampled: list[int]) -> int:
        """How many of `drafts` the rows' samples accept (`sampled` holds len(drafts) + 1 ids); the counters
        and the sequence's acceptance rate follow."""
        accepted = 0
        while accepted < len(drafts) and sampled[accepted] == drafts[accepted]:
            accepted += 1
        self.num_drafts += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += accepted
        for position in range(accepted):
            self.accepted_per_position[position] += 1
        state = self.states.get(seq_id)
        if state is not None:
            state.accepted = DECAY * state.accepted + accepted
            state.attempts = DECAY * state.attempts + accepted + (accepted < len(drafts))
            if accepted:
                state.num_pauses = 0
        return accepted

    def forget(self, seq_id: int) -> None:
        """The sequence is finished."""
        self.states.pop(seq_id, None)
        self.agent_drafts.pop(seq_id, None)

    def stats(self) -> dict:
        return {
            "spec_drafts": self.num_drafts,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_accepted_per_position": list(self.accepted_per_position),
        }
