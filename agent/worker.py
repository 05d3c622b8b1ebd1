"""The agent process: a ZeroMQ loop that runs the master's steps on one device."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import traceback
from typing import Optional

import numpy as np
import torch
import zmq

from agent.model_runner import ModelRunner
from agent.sampler import Sampler, SamplerOutput
from common.config import Config
from common.model_info import read_hf_config
from common.protocol import EXIT_BAD_PORT, EXIT_LOAD_FAILED, EXIT_MASTER_GONE, AgentFailed, AgentReady, InitAgent, Shutdown, StepRequest, StepResult, decode, encode
from common.shm import SharedArrays
from common.step_arrays import StepCapacity, input_layout, output_layout, step_inputs
from common.timers import StageTimer

logger = logging.getLogger("llmserve.agent")

PARENT_CHECK_MS = 1000


class Worker:
    """Runs steps: reads the step arrays, runs the model, samples, writes the tokens back."""

    def __init__(self, config: Config, rank: int):
        self.config = config
        self.rank = rank
        serving = config.serving_config
        self.device = torch.device("cpu" if serving.device == "cpu" else f"cuda:{serving.start_device_id + rank}")
        self.runner = ModelRunner(
            hf_config=read_hf_config(config.model_config),
            model_path=config.model_config.model_path,
            load_format=config.model_config.load_format,
            dtype=config.model_config.model_dtype,
            device=str(self.device),
            num_blocks=config.pa_config.num_blocks,
            block_size=config.pa_config.block_size,
            seed=config.model_config.seed,
        )
        self.sampler = Sampler(self.device, seed=config.model_config.seed + 1)
        self.capacity: Optional[StepCapacity] = None
        self.inputs: Optional[SharedArrays] = None
        self.outputs: Optional[SharedArrays] = None
        self.timer = StageTimer()
        self.logits_dump_dir = serving.logits_dump_dir if rank == 0 else None  # every rank has the same logits
        if self.logits_dump_dir is not None:
            os.makedirs(self.logits_dump_dir, exist_ok=True)

    def attach(self, init: InitAgent) -> AgentReady:
        """Map the master's step arrays and say what this agent holds."""
        capacity = StepCapacity(**{f.name: getattr(init, f.name) for f in dataclasses.fields(StepCapacity)})
        self.capacity = capacity
        self.close()
        self.inputs = SharedArrays.attach(init.input_shm, input_layout(capacity))
        self.outputs = SharedArrays.attach(init.output_shm, output_layout(capacity))
        return AgentReady(
            rank=self.rank,
            pid=os.getpid(),
            vocab_size=self.runner.vocab_size,
            num_layers=self.runner.num_layers,
            num_kv_blocks=self.config.pa_config.num_blocks,
            block_size=self.config.pa_config.block_size,
            dtype=self.config.model_config.model_dtype,
            device=str(self.device),
        )

    def step(self, header: StepRequest) -> StepResult:
        """Run one step; the sampled ids land in the output arrays."""
        timer = self.timer
        with timer.stage("deserialize"):
            batch = step_inputs(self.inputs.arrays, header, self.capacity.suppress_width)
        logits = self.runner.execute(
            batch.input_ids,
            batch.positions,
            batch.slot_mapping,
            batch.query_lens,
            batch.context_lens,
            batch.block_tables,
            batch.logits_indices,
            timer=timer,
            block_copies=batch.block_copies,
        )
        if header.dump_names is not None and self.logits_dump_dir is not None:
            with timer.stage("dump"):
                self.dump_logits(logits, header.dump_names)
        with timer.stage("sample"):
            output = self.sampler(logits, batch.sampling, header.is_all_greedy)
        with timer.stage("write_back"):
            self.write_back(output, header.num_sample)
        return StepResult(step_id=header.step_id, rank=self.rank, timings_ms=timer.reset())

    def write_back(self, output: SamplerOutput, num_rows: int) -> None:
        arrays = self.outputs.arrays
        arrays["sampled_ids"][:num_rows] = output.sampled_ids.cpu().numpy()
        if output.sampled_logprobs is not None:
            arrays["sampled_logprobs"][:num_rows] = output.sampled_logprobs.cpu().numpy()
        if output.topk_ids is not None:
            width = self.capacity.topk_width
            used = min(output.topk_ids.shape[1], width)
            arrays["topk_ids"][: num_rows * width].reshape(num_rows, width)[:, :used] = output.topk_ids[:, :used].cpu().numpy()
            topk_logprobs = arrays["topk_logprobs"][: num_rows * width].reshape(num_rows, width)
            topk_logprobs[:, :used] = output.topk_logprobs[:, :used].cpu().numpy()

    def dump_logits(self, logits: torch.Tensor, names: list[str]) -> None:
        """Save each sampled row's raw float32 logits as `<logits_dump_dir>/<name>`."""
        rows = logits.cpu().numpy()
        for name, row in zip(names, rows, strict=True):
            np.save(os.path.join(self.logits_dump_dir, name), row)

    def close(self) -> None:
        for segment in (self.inputs, self.outputs):
            if segment is not None:
                segment.close()
        self.inputs = self.outputs = None


def serve_agent(config: Config, rank: int, parent_pid: Optional[int] = None) -> int:
    """Bind the agent's port, load the model, then answer the master until told to stop."""
    serving = config.serving_config
    if serving.num_threads:
        torch.set_num_threads(serving.num_threads)
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 1000)
    address = f"tcp://{serving.agent_ip}:{serving.agent_ports[rank]}"
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        logger.error("agent %d cannot listen on %s: %s", rank, address, exc)
        context.destroy(linger=0)
        return EXIT_BAD_PORT
    try:
        try:
            worker = Worker(config, rank)
        except Exception as exc:  # any load failure is reported to the master, then we exit
            logger.error("agent %d failed to load the model: %s", rank, exc)
            _report_load_failure(socket, rank, f"{type(exc).__name__}: {exc}")
            return EXIT_LOAD_FAILED
        logger.info("agent %d ready on %s (%s)", rank, address, worker.device)
        socket.setsockopt(zmq.RCVTIMEO, PARENT_CHECK_MS)
        return _serve_loop(socket, worker, parent_pid)
    finally:
        context.destroy(linger=1000)


def _serve_loop(socket: zmq.Socket, worker: Worker, parent_pid: Optional[int]) -> int:
    try:
        while True:
            try:
                identity, payload = socket.recv_multipart()
                received_at = time.perf_counter()
            except zmq.Again:  # nothing for PARENT_CHECK_MS: is the master still there?
                if parent_pid is not None and os.getppid() != parent_pid:
                    logger.error("agent %d: the master (pid %d) is gone; exiting", worker.rank, parent_pid)
                    return EXIT_MASTER_GONE
                continue
            message = decode(payload)
            if isinstance(message, Shutdown):
                return 0
            reply = _handle(worker, message)
            if isinstance(reply, StepResult):
                reply.received_at, reply.replied_at = received_at, time.perf_counter()
            socket.send_multipart([identity, encode(reply)])
    finally:
        worker.close()


def _handle(worker: Worker, message) -> AgentReady | StepResult | AgentFailed:
    if isinstance(message, StepRequest):
        try:
            return worker.step(message)
        except Exception:  # the step fails, the agent lives on; the master fails that step's requests
            worker.timer.reset()
            logger.exception("agent %d: step %d failed", worker.rank, message.step_id)
            return StepResult(message.step_id, worker.rank, error=traceback.format_exc(limit=3))
    if isinstance(message, InitAgent):
        try:
            return worker.attach(message)
        except (OSError, ValueError) as exc:
            return AgentFailed(worker.rank, f"cannot attach shared memory: {exc}")
    return AgentFailed(worker.rank, f"unexpected message {type(message).__name__}")


def _report_load_failure(socket: zmq.Socket, rank: int, reason: str) -> None:
    """Answer the master's InitAgent (if it arrives soon) with the reason, so it need not guess."""
    if socket.poll(5000):
        identity, _ = socket.recv_multipart()
        socket.send_multipart([identity, encode(AgentFailed(rank, reason))])


def main(config: Config, rank: int, parent_pid: Optional[int]) -> None:
    sys.exit(serve_agent(config, rank, parent_pid))
