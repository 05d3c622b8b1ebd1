"""Where a step's arrays travel between the master and an agent: one channel object that both ends hold.

`SharedMemoryChannel` (agents on the master's host): the master creates STEP_BUFFERS pairs of segments
(inputs, outputs) and the agents attach them by name; a step message carries no arrays. `InlineChannel`
(agents on other hosts): the step message carries the used rows of each input array as extra frames, and
rank 0's answer carries the used rows of the outputs back. Either way each end reads and writes
`inputs[header.buffer]` and `outputs[header.buffer]`, the arrays of common/step_arrays.py.
"""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from llmserve.common.protocol import ProtocolError, StepRequest
from llmserve.common.shm import SharedArrays
from llmserve.common.step_arrays import (
    STEP_BUFFERS, StepCapacity, input_layout, input_lengths, output_layout, output_lengths, pack_arrays,
    unpack_arrays,
)

Arrays = dict[str, np.ndarray]


class StepChannel(abc.ABC):
    """The step buffers of one master and its agents, and how their contents reach the other end."""

    def __init__(self, capacity: StepCapacity, inputs: list[Arrays], outputs: list[Arrays]):
        self.capacity = capacity
        self.inputs = inputs  # one set of input arrays per buffer
        self.outputs = outputs

    @property
    def segment_names(self) -> tuple[list[str], list[str]]:
        """The input and output segments an agent attaches (InitAgent); none inline."""
        return [], []

    def request_frames(self, header: StepRequest) -> list:
        """Master: the frames that follow the step message (views of the buffer: it is not written again until
        this step's result is in)."""
        return []

    def take_reply(self, header: StepRequest, frames: Sequence) -> None:
        """Master: put what rank 0's reply carried into `outputs[header.buffer]`."""

    @abc.abstractmethod
    def step_arrays(self, header: StepRequest, frames: Sequence) -> tuple[Arrays, Arrays]:
        """Agent: the step's input and output arrays; ProtocolError when the frames do not fit the header."""

    def reply_frames(self, header: StepRequest) -> list:
        """Agent (rank 0): the frames that follow the step's result."""
        return []

    def close(self) -> None:
        """Release the buffers (the master also unlinks its segments)."""


class SharedMemoryChannel(StepChannel):
    """Step buffers in shared-memory segments that the master owns."""

    def __init__(self, capacity: StepCapacity, input_segments: list[SharedArrays], output_segments: list[SharedArrays]):
        super().__init__(capacity, [s.arrays for s in input_segments], [s.arrays for s in output_segments])
        self.input_segments, self.output_segments = input_segments, output_segments

    @classmethod
    def create(cls, capacity: StepCapacity) -> "SharedMemoryChannel":
        """The master's: new segments, no step's sampled ids in them yet."""
        channel = cls(capacity, [SharedArrays.create("in", input_layout(capacity)) for _ in range(STEP_BUFFERS)],
                      [SharedArrays.create("out", output_layout(capacity)) for _ in range(STEP_BUFFERS)])
        for outputs in channel.outputs:
            outputs["sampled_step"][0] = -1  # step ids start at 0
        return channel

    @classmethod
    def attach(cls, capacity: StepCapacity, input_names: list[str], output_names: list[str]) -> "SharedMemoryChannel":
        """An agent's: the master's segments by name (ValueError for the wrong number or a segment too small)."""
        if not len(input_names) == len(output_names) == STEP_BUFFERS:
            raise ValueError(f"{len(input_names)} input and {len(output_names)} output buffers, "
                             f"where this agent takes {STEP_BUFFERS} of each")
        attached: list[SharedArrays] = []
        try:
            for names, layout in ((input_names, input_layout(capacity)), (output_names, output_layout(capacity))):
                attached += [SharedArrays.attach(name, layout) for name in names]
        except (OSError, ValueError):
            for segment in attached:
                segment.close()
            raise
        return cls(capacity, attached[:STEP_BUFFERS], attached[STEP_BUFFERS:])

    @property
    def segment_names(self) -> tuple[list[str], list[str]]:
        return [s.name for s in self.input_segments], [s.name for s in self.output_segments]

    def step_arrays(self, header: StepRequest, frames: Sequence) -> tuple[Arrays, Arrays]:
        if frames:
            raise ProtocolError("array frames came with a step, but the arrays are in shared memory")
        return self.inputs[header.buffer], self.outputs[header.buffer]

    def close(self) -> None:
        for segment in self.input_segments + self.output_segments:
            segment.close()


class InlineChannel(StepChannel):
    """Step buffers in each process's own memory; the used rows travel in the messages."""

    def __init__(self, capacity: StepCapacity):
        super().__init__(
            capacity,
            [{name: np.zeros(n, dtype) for name, dtype, n in input_layout(capacity)} for _ in range(STEP_BUFFERS)],
            [{name: np.zeros(n, dtype) for name, dtype, n in output_layout(capacity)} for _ in range(STEP_BUFFERS)],
        )

    def request_frames(self, header: StepRequest) -> list:
        inputs = self.inputs[header.buffer]
        return pack_arrays(inputs, input_layout(self.capacity), input_lengths(header, self.capacity.suppress_width))

    def take_reply(self, header: StepRequest, frames: Sequence) -> None:
        if frames:
            outputs = self.outputs[header.buffer]
            for name, values in unpack_arrays(list(frames), output_layout(self.capacity)).items():
                outputs[name][: len(values)] = values

    def step_arrays(self, header: StepRequest, frames: Sequence) -> tuple[Arrays, Arrays]:
        try:
            arrays = unpack_arrays(list(frames), input_layout(self.capacity))
        except ValueError as exc:  # a frame too many or too few, or a length that is not whole elements
            raise ProtocolError(f"the step's array frames do not fit the layout: {exc}") from None
        for name, length in input_lengths(header, self.capacity.suppress_width).items():
            if len(arrays[name]) < length:
                raise ProtocolError(f"{name}: {len(arrays[name])} values where the header needs {length}")
        return arrays, self.outputs[header.buffer]

    def reply_frames(self, header: StepRequest) -> list:
        lengths = output_lengths(header, self.capacity.topk_width)
        return pack_arrays(self.outputs[header.buffer], output_layout(self.capacity), lengths)
