"""Sampling parameters of one request, as the scheduler and the agents see them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0 or self.top_k == 1

    @property
    def agent_temperature(self) -> float:
        """Temperature as sent to the agent, where 0 means greedy."""
        return 0.0 if self.is_greedy else self.temperature
