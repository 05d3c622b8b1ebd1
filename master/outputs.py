"""What a request returns: each generated sequence's text as it grows, stop strings, and the final outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tokenizers import Tokenizer

from llmserve.master.sequence import Sequence, TokenLogprobs
from llmserve.master.tokenizer import IncrementalDetokenizer


class TextOutput:
    """The text of one sequence, token by token: what may be streamed now, and whether a stop string ended it.

    A stop string split across tokens is found because the whole text is searched
    around the new characters; the text that could still begin a stop string is held
    back from the stream until it cannot. The output is cut before the stop string.
    """

    def __init__(self, tokenizer: Tokenizer, seq: Sequence):
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.num_prompt_tokens)
        self.stop = seq.params.stop
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.num_sent = 0
        self.stopped = False

    def add(self, seq: Sequence, num_tokens: Optional[int] = None) -> str:
        """Take the sequence's tokens up to `num_tokens` (all by default; a step that accepted several proposed
        tokens adds them one by one); return the text to stream now (all that is left once it is finished)."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        token_ids = seq.token_ids if num_tokens == seq.num_tokens else seq.token_ids[:num_tokens]
        searched_from = max(len(self.text) - self.hold_back, 0)
        is_last = seq.is_finished and num_tokens == seq.num_tokens
        self.text += self.detokenizer.step(token_ids, is_last=is_last)
        if self.stop and num_tokens - seq.num_prompt_tokens >= seq.params.min_new_tokens:
            cut = _first_stop(self.text, self.stop, searched_from)
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
        return self._flush(final=self.stopped or is_last)

    def _flush(self, final: bool) -> str:
        """The text not streamed yet; all of it when `final`."""
        end = len(self.text) if final else max(len(self.text) - self.hold_back, self.num_sent)
        delta = self.text[self.num_sent : end]
        self.num_sent = end
        return delta


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> Optional[int]:
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else None


@dataclass
class GenerationOutput:
    """One returned sequence."""

    index: int
    output_ids: list[int]
    text: Optional[str]  # None until Engine.decode_outputs, when no one read it token by token
    finish_reason: str
    cumulative_logprob: Optional[float] = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    score: Optional[float] = None  # beam search: the length-penalised score


def sequence_output(index: int, seq: Sequence, text: Optional[TextOutput]) -> GenerationOutput:
    """A finished sample; its text is the one streamed when it was (cut before a stop string), else decoded later."""
    return GenerationOutput(
        index=index,
        output_ids=seq.output_ids,
        text=None if text is None else text.text,
        finish_reason=seq.finish_reason.value,
        cumulative_logprob=seq.cumulative_logprob if seq.params.agent_num_logprobs >= 0 else None,
        logprobs=seq.logprobs,
    )
