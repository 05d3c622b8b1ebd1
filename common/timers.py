"""Stage timers: wall-clock milliseconds per named stage of one step."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class StageTimer:
    """Collects the milliseconds spent in each stage; reset once per step."""

    __slots__ = ("timings_ms",)

    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - start) * 1e3)

    def add(self, name: str, ms: float) -> None:
        self.timings_ms[name] = self.timings_ms.get(name, 0.0) + ms

    def reset(self) -> dict[str, float]:
        """Return the timings so far and start again."""
        timings, self.timings_ms = self.timings_ms, {}
        return timings


SUB_STAGES = ("all_reduce",)  # timed inside another stage (predict), so never added to the total


def is_own_stage(name: str) -> bool:
    """A top-level stage of the process that reported it: not part of another stage, not another rank's."""
    return "." not in name and name not in SUB_STAGES


def own_ms(timings_ms: dict[str, float]) -> float:
    """The milliseconds of the top-level stages, which do not overlap."""
    return sum(ms for name, ms in timings_ms.items() if is_own_stage(name))
