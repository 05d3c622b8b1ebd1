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
