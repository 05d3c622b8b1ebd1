"""Beam search bookkeeping for one request, with `transformers.generate(num_beams=...)`'s rules.

The agent returns, for every live beam, its best `candidates_per_beam`
continuations under the processed log-probabilities. `step` adds the beams'
running scores, keeps the best candidates overall, moves the ones that end
(an end token, or the length limit) into the finished hypotheses with the
length penalty, and picks the next live beams. Scores are float32 sums, as in
transformers, so ties break the same way. No tensors, no KV: the scheduler
forks the beams' blocks from the parents this returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

NEG_BIG = np.float32(-1.0e9)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens and its length-penalised score."""

    output_ids: list[int]
    score: float
    finish_reason: str  # "eos_token" or "length"


@dataclass
class NextBeam:
    """A live beam after a step: which current beam it extends and with what token."""

    parent: int
    token_id: int
    score: np.float32


@dataclass
class BeamSearch:
    num_beams: int
    length_penalty: float
    early_stopping: Union[bool, str]
    max_new_tokens: int
    end_token_ids: frozenset[int]
    finished: list[Hypothesis] = field(default_factory=list)
    is_done: bool = False
    improvement_possible: bool = True

    @property
    def candidates_per_beam(self) -> int:
        """Candidates kept per step (transformers keeps max(2, 1 + #end tokens) x num_beams)."""
        return max(2, 1 + len(self.end_token_ids)) * self.num_beams

    def step(
        self,
        beam_scores: Sequence[np.float32],
        beam_outputs: Sequence[list[int]],
        candidate_ids: np.ndarray,  # [live beams, candidates_per_beam]
        candidate_logprobs: np.ndarray,
    ) -> list[NextBeam]:
        """Advance every live beam by one token; return the next live beams (empty once done)."""
        keep = self.candidates_per_beam
        num_generated = len(beam_outputs[0]) + 1  # length of the candidates' outputs
        totals = (np.asarray(beam_scores, np.float32)[:, None] + candidate_logprobs.astype(np.float32)).ravel()
        flat_ids = candidate_ids.ravel()
        parents = np.repeat(np.arange(len(beam_scores)), candidate_ids.shape[1])
        order = _stable_topk(totals, keep)
        ends = [
            int(flat_ids[i]) in self.end_token_ids or num_generated >= self.max_new_tokens for i in order
        ]
        self._add_finished(order[: self.num_beams], ends[: self.num_beams], totals, flat_ids, parents, beam_outputs, num_generated)
        live = [i for i, end in zip(order, ends) if not end][: self.num_beams]
        next_beams = [NextBeam(int(parents[i]), int(flat_ids[i]), totals[i]) for i in live]
        self._update_done(next_beams, num_generated, all(ends))
        return [] if self.is_done else next_beams

    def _add_finished(self, top, ends, totals, flat_ids, parents, beam_outputs, num_generated) -> None:
        if (self.early_stopping is True and len(self.finished) >= self.num_beams) or not self.improvement_possible:
            return
        for i, end in zip(top, ends):
            if not end:
                continue
            token = int(flat_ids[i])
            reason = "eos_token" if token in self.end_token_ids else "length"
            output = beam_outputs[int(parents[i])] + [token]
            self.finished.append(Hypothesis(output, self._penalised(totals[i], num_generated), reason))
        self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del self.finished[self.num_beams :]

    def _update_done(self, next_beams: list[NextBeam], num_generated: int, all_end: bool) -> None:
        full = len(self.finished) >= self.num_beams
        if full and next_beams:
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_length = self.max_new_tokens
            else:
                best_length = num_generated
            best_possible = self._penalised(next_beams[0].score, best_length)
            self.improvement_possible = self.improvement_possible and best_possible > self.finished[-1].score
        self.is_done = (
            not self.improvement_possible or (full and self.early_stopping is True) or all_end or not next_beams
        )

    def _penalised(self, total: np.float32, length: int) -> float:
        """total / length ** length_penalty in float32, as transformers scores a beam.

        An extreme length_penalty makes the power overflow or vanish; the score is then clipped to
        float32's range (NaN as its lowest), so it still ranks and answers stay valid JSON.
        """
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            score = np.float32(total) / np.float32(length) ** np.float32(self.length_penalty)
        return float(np.nan_to_num(score, nan=-FLOAT32_MAX, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX))

    def results(self, n: int) -> list[Hypothesis]:
        """The n best finished hypotheses."""
        return self.finished[:n]


def _stable_topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, larger first, earlier index first on ties."""
    order = np.argsort(-values, kind="stable")
    return order[:k]
