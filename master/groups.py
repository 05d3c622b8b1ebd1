"""What the sequences of one request do together: the n / best_of samples forked at the first token, and
the beams of a beam search. Both share blocks through the block manager; the scheduler only applies the
changes they return to its running list."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmserve.master.beam_search import BeamSearch
from llmserve.master.block_manager import BlockManager
from llmserve.master.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class GroupChange:
    """What a group's step did: tokens appended, sequences forked (parent, child), beams finished."""

    new_tokens: list[tuple[Sequence, int]] = field(default_factory=list)
    forked: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


def fork_samples(seq: Sequence, blocks: BlockManager, next_seq_id: Callable[[], int]) -> list[Sequence]:
    """The other samples of a request at its first token: sequences sharing the prompt's blocks."""
    children = []
    for sample_index in range(1, seq.pending_forks + 1):
        child = seq.fork(next_seq_id(), sample_index)
        blocks.fork(seq, child)
        children.append(child)
    seq.pending_forks = 0
    return children


@dataclass(eq=False)
class BeamGroup:
    """The beams of one request: the search, each live beam's score, and the candidates of this round."""

    search: BeamSearch
    beams: list[Sequence] = field(default_factory=list)
    scores: dict[int, object] = field(default_factory=dict)  # seq_id -> float32 running score
    candidates: dict[int, tuple] = field(default_factory=dict)  # seq_id -> (ids, logprobs) this round

    def collect(self, beam: Sequence, topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> None:
        """A beam's best continuations from this step's sampled row."""
        width = self.search.candidates_per_beam
        self.candidates[beam.seq_id] = (topk_ids[:width].copy(), topk_logprobs[:width].copy())

    def drop(self, beam: Sequence) -> None:
        """A preempted beam is recomputed before the group moves on: forget its candidates."""
        self.candidates.pop(beam.seq_id, None)

    @property
    def is_ready(self) -> bool:
        """Every live beam has its candidates."""
        return all(beam.seq_id in self.candidates for beam in self.beams)

    def advance(self, blocks: BlockManager, next_seq_id: Callable[[], int]) -> GroupChange:
        """Pick the next beams; each takes its parent's tokens and blocks, and the rest end."""
        beams, change = self.beams, GroupChange()
        next_beams = self.search.step(
            [self.scores[beam.seq_id] for beam in beams],
            [beam.output_ids for beam in beams],
            np.stack([self.candidates[beam.seq_id][0] for beam in beams]),
            np.stack([self.candidates[beam.seq_id][1] for beam in beams]),
        )
        self.candidates.clear()
        parents = [(list(beam.token_ids), list(beam.block_ids), list(beam.block_hashes), beam.num_computed)
                   for beam in beams]
        for chosen in next_beams:  # take the new references before dropping the old ones
            blocks.share(parents[chosen.parent][1])
        for beam in beams:
            blocks.free(beam)
        targets = beams[: len(next_beams)]
        for extra in range(len(beams), len(next_beams)):
            child = beams[0].fork(next_seq_id(), sample_index=extra)
            change.forked.append((beams[0], child))
            targets.append(child)
        for target, chosen in zip(targets, next_beams):
            token_ids, block_ids, block_hashes, num_computed = parents[chosen.parent]
            target.token_ids = token_ids + [chosen.token_id]
            target.block_ids, target.block_hashes, target.num_computed = list(block_ids), list(block_hashes), num_computed
            self.scores[target.seq_id] = chosen.score
            change.new_tokens.append((target, chosen.token_id))
        for beam in beams[len(next_beams) :]:  # the search is over, or fewer beams can go on
            beam.status = SequenceStatus.FINISHED
            beam.finish_reason = FinishReason.EOS if self.search.finished else FinishReason.LENGTH
            change.finished.append(beam)
        self.beams = targets
        self.scores = {beam.seq_id: self.scores[beam.seq_id] for beam in targets}
        return change
