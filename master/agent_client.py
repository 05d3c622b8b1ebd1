"""The master's side of the IPC seam: send a step to the agents, get the result back.

`Transport` is the interface; `ZmqShmTransport` is the real one (ZeroMQ control,
shared-memory arrays) and `InProcessTransport` runs a step function in this
process so the whole engine can be tested without agents.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from llmserve.common.agent_keys import ChannelKeys, secure_client
from llmserve.common.errors import AgentFailure
from llmserve.common.protocol import (
    AGENT_EXIT_REASONS, AgentFailed, AgentReady, InitAgent, ProtocolError, Shutdown, StepMasks, StepRequest, StepResult,
    decode, encode,
)
from llmserve.common.channel import InlineChannel, SharedMemoryChannel, StepChannel
from llmserve.common.step_arrays import StepCapacity, fill_pending_tokens, step_inputs

logger = logging.getLogger("llmserve.master")

POLL_S = 0.1  # how often a wait for an agent checks that the agents still live
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Transport(abc.ABC):
    """Moves steps to the agents and results back. Two steps may be in flight at once, each in its own pair
    of buffers (`inputs[header.buffer]`, `outputs[header.buffer]`); results come back in the order sent."""

    inputs: list[dict[str, np.ndarray]]  # one set of step arrays per buffer
    outputs: list[dict[str, np.ndarray]]
    can_overlap: bool = True  # the agents fill a step's pending tokens from the step before

    @abc.abstractmethod
    async def start(self, timeout: float) -> list[AgentReady]:
        """Wait until every agent is ready; raise AgentFailure if one cannot start."""

    @abc.abstractmethod
    async def send(self, header: StepRequest) -> None:
        """Send one step whose inputs are already in `inputs[header.buffer]`."""

    @abc.abstractmethod
    async def send_masks(self, header: StepRequest, masks: np.ndarray) -> None:
        """The token masks of a step sent with masks_follow (rank 0 samples, so only it gets them)."""

    @abc.abstractmethod
    async def receive(self, header: StepRequest) -> StepResult:
        """The result of the oldest step sent and not received, `header`'s; its tokens are in `outputs[header.buffer]`."""

    @abc.abstractmethod
    def failure(self) -> Optional[str]:
        """Why the agents cannot serve any more, or None while they can."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the agents and release every shared resource."""


@dataclass
class AgentEndpoint:
    """Where one agent listens, and its process when this master launched it."""

    rank: int
    address: str
    process: Optional[subprocess.Popen] = None


class ZmqShmTransport(Transport):
    """ZeroMQ DEALER sockets to each agent's ROUTER; arrays in shared memory this master owns.

    With `inline` (agents on other hosts) there is no shared memory: each step
    message carries the used rows of the input arrays as extra frames, and rank
    0's reply carries the sampled rows back (common/channel.py). Same messages otherwise.
    """

    def __init__(
        self, endpoints: list[AgentEndpoint], capacity: StepCapacity, step_timeout: float, keys: ChannelKeys,
        inline: bool = False,
    ):
        self.endpoints = endpoints
        self.capacity = capacity
        self.step_timeout = step_timeout
        self.context = zmq.asyncio.Context()
        self.sync_context = zmq.Context.shadow(self.context.underlying)  # for the monitors, read without awaiting
        self.sockets: list[zmq.asyncio.Socket] = []
        self.monitors: list[zmq.Socket] = []
        self.was_connected = [False] * len(endpoints)
        self._failure: Optional[str] = None
        self.can_overlap = len(endpoints) == 1 or not inline  # other ranks read rank 0's samples in shared memory
        self.channel: StepChannel = InlineChannel(capacity) if inline else SharedMemoryChannel.create(capacity)
        self.inputs, self.outputs = self.channel.inputs, self.channel.outputs
        for endpoint in endpoints:
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            secure_client(socket, keys)
            self.monitors.append(self._monitor(socket, endpoint.rank))
            socket.connect(endpoint.address)
            self.sockets.append(socket)

    def _monitor(self, socket: zmq.asyncio.Socket, rank: int) -> zmq.Socket:
        """A PAIR socket that receives `socket`'s handshake and disconnect events."""
        address = f"inproc://llmserve-monitor-{id(self)}-{rank}"
        socket.monitor(address, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILURES)
        monitor = self.sync_context.socket(zmq.PAIR)
        monitor.connect(address)
        return monitor

    async def start(self, timeout: float) -> list[AgentReady]:
        input_shms, output_shms = self.channel.segment_names
        init = InitAgent(
            input_shms=input_shms,
            output_shms=output_shms,
            **dataclasses.asdict(self.capacity),
        )
        deadline = time.monotonic() + timeout
        for socket in self.sockets:  # all at once: ranks wait for each other while they load
            await socket.send(encode(init))
        replies = await asyncio.gather(
            *(self._receive(e, s, deadline, what="to start") for e, s in zip(self.endpoints, self.sockets)),
            return_exceptions=True,
        )
        answers = [reply[0] for reply in replies if not isinstance(reply, BaseException)]
        failed = next((answer for answer in answers if isinstance(answer, AgentFailed)), None)
        if failed is not None:  # the reason a rank gave beats "another rank went away"
            raise AgentFailure(f"agent {failed.rank} failed to start: {failed.reason}")
        errors = [reply for reply in replies if isinstance(reply, BaseException)]
        if errors:
            raise errors[0]
        for endpoint, answer in zip(self.endpoints, answers):
            if not isinstance(answer, AgentReady):
                raise AgentFailure(f"agent {endpoint.rank} answered {type(answer).__name__} instead of ready")
        return answers

    async def send(self, header: StepRequest) -> None:
        message = [encode(header), *self.channel.request_frames(header)]
        for socket in self.sockets:
            await socket.send_multipart(message, copy=False)

    async def send_masks(self, header: StepRequest, masks: np.ndarray) -> None:
        await self.sockets[0].send(encode(StepMasks(header.step_id, masks.tobytes())), copy=False)

    async def receive(self, header: StepRequest) -> StepResult:
        deadline = time.monotonic() + self.step_timeout
        replies = [await self._receive(e, s, deadline, what="to run a step") for e, s in zip(self.endpoints, self.sockets)]
        results = [result for result, _ in replies]
        self.channel.take_reply(header, replies[0][1])
        for result in results:
            if not isinstance(result, StepResult) or result.step_id != header.step_id:
                self._fail(f"agent answered {result!r} to step {header.step_id}")
        errors = [r.error for r in results if r.error]
        if errors and len(results) > 1:  # the ranks are out of step (one skipped its all-reduces): nothing can run now
            self._fail(f"a step failed on agent {next(r.rank for r in results if r.error)}, so the ranks are out of step: {errors[0]}")
        first = results[0]
        return StepResult(
            header.step_id, first.rank, _merge_timings(results), errors[0] if errors else None, first.received_at, first.replied_at
        )

    async def _receive(self, endpoint: AgentEndpoint, socket: zmq.asyncio.Socket, deadline: float, what: str):
        """The agent's next message and the array frames after it (inline transport)."""
        reply = socket.recv_multipart()
        while not (await asyncio.wait([reply], timeout=POLL_S))[0]:
            if self.failure() is not None or time.monotonic() > deadline:
                reply.cancel()
                self._fail(self._failure or f"agent {endpoint.rank} at {endpoint.address} took too long {what}")
        payload, *frames = reply.result()
        try:
            return decode(payload), frames
        except ProtocolError as exc:  # an agent of another version, or a bug: it cannot serve this master
            self._fail(f"agent {endpoint.rank} at {endpoint.address} sent a message this master cannot read: {exc}")

    def failure(self) -> Optional[str]:
        if self._failure is None:
            self._check_agents()
        return self._failure

    def _check_agents(self) -> None:
        for i, endpoint in enumerate(self.endpoints):
            if endpoint.process is not None and endpoint.process.poll() is not None:
                code = endpoint.process.returncode
                why = AGENT_EXIT_REASONS.get(code, "see its log")
                self._failure = f"agent {endpoint.rank} (pid {endpoint.process.pid}) exited with code {code}: {why}"
                return
            while self.monitors[i].poll(0):
                event = recv_monitor_message(self.monitors[i])["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.was_connected[i] = True
                elif event == zmq.EVENT_DISCONNECTED and self.was_connected[i]:
                    self._failure = f"agent {endpoint.rank} at {endpoint.address} closed its connection"
                    return
                elif event & HANDSHAKE_FAILURES:
                    self._failure = (
                        f"agent {endpoint.rank} at {endpoint.address} refused this master's CURVE key, or holds another "
                        "agent key: both sides need keys of one `llmserve keys` directory (serving_config.agent_keys_dir)"
                    )
                    return

    def _fail(self, reason: str) -> None:
        self._failure = self._failure or reason
        raise AgentFailure(self._failure)

    async def close(self) -> None:
        if self.context.closed:
            return
        for socket in self.sockets:
            try:
                await socket.send(encode(Shutdown()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        await asyncio.sleep(0)
        for monitor, socket in zip(self.monitors, self.sockets):
            socket.disable_monitor()
            monitor.close(0)
            socket.close(0)
        self.context.term()
        self.channel.close()


def _merge_timings(results: list[StepResult]) -> dict:
    """Rank 0's stage timings as they are, the other ranks' as `rank<r>.<stage>`."""
    timings = dict(results[0].timings_ms)
    for result in results[1:]:
        timings.update((f"rank{result.rank}.{stage}", ms) for stage, ms in result.timings_ms.items())
    return timings


StepFunction = Callable[[StepRequest, dict[str, np.ndarray], dict[str, np.ndarray]], StepResult]


class InProcessTransport(Transport):
    """Runs `step_fn` in this process over plain numpy arrays: the agent without a process. As an agent does,
    it fills a step's pending tokens from the sampled ids of the step it follows before `step_fn` sees it."""

    def __init__(self, capacity: StepCapacity, step_fn: StepFunction, ready: AgentReady):
        self.capacity = capacity
        channel = InlineChannel(capacity)  # its buffers: plain arrays of this process
        self.inputs, self.outputs = channel.inputs, channel.outputs
        self.step_fn = step_fn
        self.ready = ready
        self.dead_reason: Optional[str] = None
        self.results: deque[StepResult] = deque()
        self.sampled: tuple[int, Optional[np.ndarray]] = (-1, None)  # the last step's id and sampled ids
        self.waiting: Optional[StepRequest] = None  # a step sent with masks_follow: it runs when they come

    async def start(self, timeout: float) -> list[AgentReady]:
        return [self.ready]

    async def send(self, header: StepRequest) -> None:
        if self.dead_reason:
            raise AgentFailure(self.dead_reason)
        await asyncio.sleep(0)
        inputs = self.inputs[header.buffer]
        step_id, sampled = self.sampled
        batch = step_inputs(inputs, header, self.capacity.suppress_width)
        try:  # as an agent would: pending tokens from the step followed, which must be the last, and have run well
            fill_pending_tokens(batch, sampled if header.follows_step == step_id >= 0 else None)
        except ValueError as exc:
            self.sampled = (header.step_id, None)
            self.results.append(StepResult(header.step_id, 0, error=f"the agent refused the step: {exc}"))
            return
        if header.follows_step >= 0:  # the filled arrays written back where step_fn reads them
            inputs["input_ids"][: header.num_tokens] = batch.input_ids
            inputs["history_ids"][: header.num_history_ids] = batch.history_ids
        if header.masks_follow:
            self.waiting = header
            return
        self._run(header)

    async def send_masks(self, header: StepRequest, masks: np.ndarray) -> None:
        if self.waiting is None or self.waiting.step_id != header.step_id:
            return  # the step was refused: as an agent does, drop its masks
        self.waiting = None
        self.inputs[header.buffer]["token_masks"][: len(masks)] = masks
        self._run(header)

    def _run(self, header: StepRequest) -> None:
        inputs, outputs = self.inputs[header.buffer], self.outputs[header.buffer]
        result = self.step_fn(header, inputs, outputs)
        self.sampled = (header.step_id, None if result.error else outputs["sampled_ids"][: header.num_sample].copy())
        self.results.append(result)

    async def receive(self, header: StepRequest) -> StepResult:
        if self.dead_reason:
            raise AgentFailure(self.dead_reason)
        return self.results.popleft()

    def failure(self) -> Optional[str]:
        return self.dead_reason

    async def close(self) -> None:
        pass
