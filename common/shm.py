"""Named shared-memory segments holding a fixed set of numpy arrays.

The master creates (and finally unlinks) every segment; agents only attach.
"""
from __future__ import annotations

import os
import sys
import uuid
from multiprocessing import resource_tracker, shared_memory

import numpy as np

SEGMENT_PREFIX = "llmserve_"
ALIGNMENT = 64


def segment_name(role: str) -> str:
    """A fresh segment name that says who made it (`llmserve_<pid>_<role>_<random>`)."""
    return f"{SEGMENT_PREFIX}{os.getpid()}_{role}_{uuid.uuid4().hex[:8]}"


class SharedArrays:
    """A shared-memory segment laid out as named 1-D numpy arrays."""

    def __init__(self, segment: shared_memory.SharedMemory, layout: list[tuple[str, np.dtype, int]], owner: bool):
        self.segment = segment
        self.owner = owner
        self.arrays: dict[str, np.ndarray] = {}
        offset = 0
        for name, dtype, length in layout:
            dtype = np.dtype(dtype)
            self.arrays[name] = np.ndarray((length,), dtype=dtype, buffer=segment.buf, offset=offset)
            offset = _align(offset + dtype.itemsize * length)

    @classmethod
    def create(cls, role: str, layout: list[tuple[str, np.dtype, int]]) -> "SharedArrays":
        """Create a new zero-filled segment big enough for `layout`."""
        segment = shared_memory.SharedMemory(name=segment_name(role), create=True, size=layout_bytes(layout))
        return cls(segment, layout, owner=True)

    @classmethod
    def attach(cls, name: str, layout: list[tuple[str, np.dtype, int]]) -> "SharedArrays":
        """Attach to a segment the master created; this process will never unlink it."""
        segment = _attach_untracked(name)
        if segment.size < layout_bytes(layout):
            segment.close()
            raise ValueError(f"shared memory {name} is smaller than its layout needs")
        return cls(segment, layout, owner=False)

    @property
    def name(self) -> str:
        return self.segment.name

    def unlink(self) -> None:
        """Remove the name now; the mappings stay until each process closes them (or exits)."""
        if self.owner:
            self.segment.unlink()
            self.owner = False

    def close(self) -> None:
        """Drop this process's mapping; the owner also unlinks the segment."""
        self.arrays.clear()
        try:
            self.segment.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if self.owner:
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass


def layout_bytes(layout: list[tuple[str, np.dtype, int]]) -> int:
    """Bytes a layout occupies, every array aligned to 64 bytes."""
    offset = 0
    for _, dtype, length in layout:
        offset = _align(offset + np.dtype(dtype).itemsize * length)
    return max(offset, 1)


def _align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach without telling this process's resource tracker. Python < 3.13 registers attached segments too:
    that starts the tracker (a process of its own, which outlives an agent by a second or more) and would have
    it unlink the master's segment when this process exits (CPython issue 82300)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args: None  # for this one call; creating segments registers them as ever
    try:
        return shared_memory.SharedMemory(name=name, create=False)
    finally:
        resource_tracker.register = register
