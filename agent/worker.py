"""The agent process: a ZeroMQ loop that runs the master's steps on one device."""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import sys
import time
import traceback
from typing import Callable, Optional, Sequence

import numpy as np
import psutil
import torch
import zmq

from llmserve.agent.draft import DraftModel
from llmserve.agent.kv_cache import available_memory, kv_cache_size
from llmserve.agent.model_runner import ModelRunner, TokenScores
from llmserve.agent.sampler import Sampler, SamplerOutput, apply_token_masks
from llmserve.agent.sequence_table import SequenceTable
from llmserve.agent.step_check import PoolShape, check_header, check_inputs
from llmserve.agent.tensor_parallel import (
    AllReduceTimer, Shard, SharedMemoryAllReduce, add_all_reduces, can_share_memory, init_group,
)
from llmserve.common.agent_keys import ChannelKeys, secure_server
from llmserve.common.config import Config, ModelConfig
from llmserve.common.model_info import model_info, read_hf_config
from llmserve.common.protocol import (
    EXIT_BAD_PORT, EXIT_LOAD_FAILED, EXIT_MASTER_GONE, AgentFailed, AgentReady, InitAgent, ProtocolError,
    Shutdown, StepMasks, StepRequest, StepResult, decode, encode,
)
from llmserve.common.channel import InlineChannel, SharedMemoryChannel, StepChannel
from llmserve.common.step_arrays import StepCapacity, StepInputs, fill_pending_tokens, step_inputs
from llmserve.common.timers import StageTimer

logger = logging.getLogger("llmserve.agent")

PARENT_CHECK_MS = 1000


class MasterShutdown(Exception):
    """The master said Shutdown while a step waited for its token masks."""


MaskSource = Callable[[StepRequest, float], np.ndarray]  # (step, timeout in s) -> its StepMasks' words


class Worker:
    """Runs steps: reads the step arrays, runs the model, samples, writes the tokens back."""

    def __init__(self, config: Config, rank: int, device_id: Optional[int] = None):
        self.config = config
        self.rank = rank
        serving = config.serving_config
        index = serving.start_device_id + rank if device_id is None else device_id
        self.device = torch.device("cpu" if serving.device == "cpu" else f"cuda:{index}")
        self.shard = Shard(rank, serving.world_size)
        self.all_reduce_timer = AllReduceTimer()
        if self.shard.world > 1:
            backend = "gloo" if serving.device == "cpu" else "nccl"
            init_group(backend, serving.dist_ip, serving.dist_port, self.shard, serving.agent_start_timeout)
        hf_config = read_hf_config(config.model_config)
        self.max_seq_len = model_info(config.model_config, hf_config).max_seq_len
        self.draft = self._load_draft(config, hf_config) if config.speculative_config.method == "draft" else None
        draft_block_bytes = 0 if self.draft is None else self.draft.runner.block_bytes
        self.runner = ModelRunner(
            hf_config=hf_config,
            model_path=config.model_config.model_path,
            load_format=config.model_config.load_format,
            dtype=config.model_config.model_dtype,
            device=str(self.device),
            num_blocks=lambda block_bytes: self._kv_blocks(block_bytes + draft_block_bytes),
            block_size=config.pa_config.block_size,
            seed=config.model_config.seed,
            shard=self.shard,
            attention_backend=config.model_config.attention_backend,
            linear_kernel=config.model_config.linear_kernel,
            quantization=config.model_config.quantization,
            quantize_lm_head=config.model_config.quantize_lm_head,
            quantization_group_size=config.model_config.quantization_group_size,
            kv_cache_dtype=config.pa_config.kv_cache_dtype,
            max_seq_len=self.max_seq_len,
        )
        if self.draft is not None:
            if self.draft.runner.vocab_size != self.runner.vocab_size:
                raise ValueError(f"speculative_config: the draft model's vocabulary has {self.draft.runner.vocab_size} "
                                 f"tokens, the model's {self.runner.vocab_size}: a draft must share the tokenizer")
            self.draft.allocate(self.runner.num_blocks)
        self.shared_all_reduce = None
        if self.shard.world > 1:
            add_all_reduces(self.runner.model, self.all_reduce_timer, self._all_reduce_function(config))
        self.sampler = Sampler(self.device, seed=config.model_config.seed + 1)
        self.capacity: Optional[StepCapacity] = None
        self.sequences = SequenceTable(0, 0)
        self.channel: Optional[StepChannel] = None  # the step buffers: the master's segments, or inline
        self.input_arrays: dict[str, np.ndarray] = {}  # this step's: a buffer's arrays, or the inline arrays
        self.output_arrays: dict[str, np.ndarray] = {}
        # the last step that ran well here: its id and sampled ids (rank 0; the other ranks read them from rank 0's
        # output buffer when a step follows it: which buffer, and how many rows)
        self.sampled: tuple[int, Optional[np.ndarray]] = (-1, None)
        self.sampled_at: tuple[int, int] = (0, 0)
        self.timer = StageTimer()
        self.last_step_id = -1
        self.mask_source: Optional[MaskSource] = None  # where a step sent with masks_follow gets them (the socket)
        self.pool = PoolShape(self.runner.num_blocks, config.pa_config.block_size, self.runner.vocab_size)
        self.logits_dump_dir = serving.logits_dump_dir if rank == 0 else None  # every rank has the same logits
        if self.logits_dump_dir is not None:
            os.makedirs(self.logits_dump_dir, exist_ok=True)

    def _load_draft(self, config: Config, hf_config: dict) -> DraftModel:
        """The speculative draft model: its own checkpoint, or a slice of the model's first layers."""
        spec, model = config.speculative_config, config.model_config
        path = spec.draft_model_path
        draft_config = read_hf_config(ModelConfig(model_path=path)) if path else hf_config
        runner = ModelRunner(
            hf_config=draft_config,
            model_path=path or model.model_path,
            load_format="auto" if path else model.load_format,
            dtype=spec.draft_model_dtype or model.model_dtype,
            device=str(self.device),
            num_blocks=1,  # sized with the target's pool once the target is in memory
            block_size=config.pa_config.block_size,
            seed=model.seed,
            attention_backend=model.attention_backend,
            linear_kernel=model.linear_kernel,
            max_seq_len=self.max_seq_len,
            num_layers=spec.draft_num_layers,
        )
        logger.info("agent %d: draft model %s, %d layers", self.rank, path or "sliced from the model",
                    runner.num_layers)
        return DraftModel(runner, config.pa_config.block_size)

    def _kv_blocks(self, block_bytes: int) -> int:
        """The KV blocks of this rank, from pa_config and the memory left after the weights."""
        config = self.config
        blocks_per_seq = -(-self.max_seq_len // config.pa_config.block_size)
        ranks_here = self.shard.world if config.serving_config.device == "cpu" and config.serving_config.transport == "shm" else 1
        try:
            size = kv_cache_size(
                config.pa_config, block_bytes, available_memory(self.device), blocks_per_seq,
                config.scheduler_config.decode_batch_size, ranks_here,
            )
        except ValueError as exc:
            raise ValueError(f"pa_config.{exc}") from None
        logger.info(
            "agent %d: KV cache of %d blocks (%d tokens, %.2f GiB, %s)", self.rank, size.num_blocks,
            size.num_blocks * config.pa_config.block_size, size.num_bytes / 2**30, config.pa_config.kv_cache_dtype,
        )
        return size.num_blocks

    def _all_reduce_function(self, config: Config):
        """Shared memory between the ranks of one host's CPUs, else torch.distributed (gloo or NCCL)."""
        serving = config.serving_config
        if not can_share_memory(serving.device, serving.transport):
            return torch.distributed.all_reduce
        max_elements = config.scheduler_config.max_num_batched_tokens * self.runner.model.config.hidden_size
        self.shared_all_reduce = SharedMemoryAllReduce(self.shard, max_elements, self.runner.dtype, serving.step_timeout)
        return self.shared_all_reduce

    def attach(self, init: InitAgent) -> AgentReady:
        """Map the master's step arrays (or expect them inline) and say what this agent holds."""
        capacity = StepCapacity(**{f.name: getattr(init, f.name) for f in dataclasses.fields(StepCapacity)})
        self.capacity = capacity
        max_tokens = capacity.max_blocks_per_seq * self.config.pa_config.block_size
        # a new master resends everything
        self.sequences = SequenceTable(capacity.max_blocks_per_seq, max_tokens, capacity.max_num_seqs)
        self.last_step_id = -1  # a new master counts from 0 again
        self.sampled = (-1, None)
        self.close()
        if init.input_shms or init.output_shms:
            self.channel = SharedMemoryChannel.attach(capacity, init.input_shms, init.output_shms)
        else:
            self.channel = InlineChannel(capacity)
        return AgentReady(
            rank=self.rank,
            pid=os.getpid(),
            vocab_size=self.runner.vocab_size,
            num_layers=self.runner.num_layers,
            num_kv_blocks=self.runner.num_blocks,
            kv_cache_bytes=self.runner.num_blocks * self.runner.block_bytes + (self.draft.kv_cache_bytes if self.draft else 0),
            kernels={**self.runner.kernels, **({"draft": f"{self.draft.runner.num_layers} layers"} if self.draft else {})},
            block_size=self.config.pa_config.block_size,
            dtype=self.config.model_config.model_dtype,
            device=str(self.device),
        )

    def step(self, header: StepRequest, frames: Sequence[zmq.Frame] = ()) -> StepResult:
        """Run one step (its arrays came as `frames` with the inline transport); the sampled ids land in the output arrays.

        Raises ProtocolError, before touching the model, for a step that does not fit; or after the forward, when
        the token masks of a step sent with masks_follow do not come.
        """
        timer = self.timer
        with timer.stage("deserialize"):
            batch = self.accept(header, frames)
            block_tables = self.sequences.apply(header, batch)
            rows = self.sequences.sampling_rows(batch) if self.rank == 0 else None  # only rank 0 samples
        runner = self.runner
        hidden = runner.forward(batch.input_ids, batch.positions, batch.slot_mapping, batch.query_lens,
                                batch.context_lens, block_tables, timer, batch.block_copies)
        if self.shard.world > 1:
            timer.add("all_reduce", self.all_reduce_timer.take())  # part of predict
        if self.rank != 0:  # only rank 0 samples and answers with tokens
            self.sampled, self.sampled_at = (header.step_id, None), (header.buffer, header.num_sample)
            return StepResult(step_id=header.step_id, rank=self.rank, timings_ms=timer.reset())
        logits = runner.logits(hidden, batch.logits_indices, timer)
        if header.dump_names is not None and self.logits_dump_dir is not None:
            with timer.stage("dump"):
                self.dump_logits(logits, header.dump_names)
        masks = batch.token_masks
        if header.masks_follow:
            with timer.stage("wait_masks"):  # ~0 when the master made them while the forward ran
                masks = self.late_masks(header)
        with timer.stage("sample"):
            if header.masked_rows:  # structured output: before every other filter
                apply_token_masks(logits, header.masked_rows, masks)
            output = self.sampler(logits, rows, header.is_all_greedy)
        if self.draft is not None:
            with timer.stage("draft"):
                self.draft.copy_blocks(batch.block_copies)
                proposals = self.output_arrays["draft_ids"][: header.num_seqs * header.draft_width]
                self.draft.propose(batch, block_tables, self.sequences.lengths_of(batch.seq_ids),
                                   output.sampled_ids.cpu().numpy(), proposals.reshape(header.num_seqs, header.draft_width))
        scores = None
        if header.num_prompt_positions:
            with timer.stage("score_prompt"):
                scores = runner.score_tokens(hidden, batch.prompt_positions, batch.prompt_targets, header.prompt_num_top)
        with timer.stage("write_back"):
            self.write_back(output, header.num_sample)
            self.sampled = (header.step_id, self.output_arrays["sampled_ids"][: header.num_sample].copy())
            self.output_arrays["sampled_step"][0] = header.step_id  # after the ids: the other ranks wait on it
            if scores is not None:
                self.write_prompt_scores(scores)
        return StepResult(step_id=header.step_id, rank=self.rank, timings_ms=timer.reset())

    def late_masks(self, header: StepRequest) -> np.ndarray:
        """The masks of a step sent with masks_follow, from its StepMasks message; ProtocolError when they do
        not come within step_timeout or do not fit the step."""
        if self.mask_source is None:
            raise ProtocolError(f"step {header.step_id}: its token masks follow, but nothing here can receive them")
        words = self.mask_source(header, self.config.serving_config.step_timeout)
        rows = len(header.masked_rows)
        if len(words) != rows * header.mask_width:
            raise ProtocolError(f"step {header.step_id}: {len(words)} mask words for {rows} rows of "
                                f"{header.mask_width}")
        return words.reshape(rows, header.mask_width)

    def accept(self, header: StepRequest, frames: Sequence[zmq.Frame]) -> StepInputs:
        """The step's rows, once its id, counts, arrays and indices are checked."""
        if self.capacity is None:
            raise ProtocolError("a step before InitAgent")
        if header.step_id <= self.last_step_id:
            raise ProtocolError(f"step id {header.step_id} is not after the last step, {self.last_step_id}")
        check_header(header, self.capacity)
        self.input_arrays, self.output_arrays = self.channel.step_arrays(header, [frame.buffer for frame in frames])
        batch = step_inputs(self.input_arrays, header, self.capacity.suppress_width)
        self._fill_pending(header, batch)
        check_inputs(batch, self.pool)
        self.sequences.check(header, batch)
        self.last_step_id = header.step_id
        return batch

    def _fill_pending(self, header: StepRequest, batch: StepInputs) -> None:
        """A step planned while the one before ran (overlapped scheduling) takes its pending tokens from that
        step's sampled ids; ProtocolError unless that is the step this agent ran last, and it ran well."""
        sampled = None  # a step that follows none may hold no pending token
        if header.follows_step >= 0:
            step_id, sampled = self.sampled
            if header.follows_step != self.last_step_id or step_id != header.follows_step:
                raise ProtocolError(f"step {header.step_id} follows step {header.follows_step}, whose sampled ids this "
                                    "agent does not hold (that step failed, or another ran after it)")
            if sampled is None:
                sampled = self._rank_0_samples(header.follows_step)
        try:
            fill_pending_tokens(batch, sampled)
        except ValueError as exc:
            raise ProtocolError(f"step {header.step_id}: {exc}") from None

    def _rank_0_samples(self, step_id: int) -> np.ndarray:
        """The ids rank 0 sampled in step `step_id`, from its output buffer once it marks them written (it may
        still be sampling: this rank answers as soon as the forward is done)."""
        if not isinstance(self.channel, SharedMemoryChannel):
            raise ProtocolError(f"step {step_id}'s sampled ids reach the other ranks only through shared memory")
        buffer, num_sample = self.sampled_at
        outputs = self.channel.outputs[buffer]
        deadline = time.monotonic() + self.config.serving_config.step_timeout
        while int(outputs["sampled_step"][0]) != step_id:
            if time.monotonic() > deadline:
                raise ProtocolError(f"rank 0 did not share step {step_id}'s sampled ids in time")
            time.sleep(0)
        return outputs["sampled_ids"][:num_sample].copy()

    def write_back(self, output: SamplerOutput, num_rows: int) -> None:
        arrays = self.output_arrays
        arrays["sampled_ids"][:num_rows] = output.sampled_ids.cpu().numpy()
        if output.sampled_logprobs is not None:
            arrays["sampled_logprobs"][:num_rows] = output.sampled_logprobs.cpu().numpy()
        if output.topk_ids is not None:
            width = self.capacity.topk_width
            used = min(output.topk_ids.shape[1], width)
            arrays["topk_ids"][: num_rows * width].reshape(num_rows, width)[:, :used] = output.topk_ids[:, :used].cpu().numpy()
            topk_logprobs = arrays["topk_logprobs"][: num_rows * width].reshape(num_rows, width)
            topk_logprobs[:, :used] = output.topk_logprobs[:, :used].cpu().numpy()

    def write_prompt_scores(self, scores: TokenScores) -> None:
        arrays, rows = self.output_arrays, len(scores.logprobs)
        arrays["prompt_logprobs"][:rows] = scores.logprobs
        arrays["prompt_ranks"][:rows] = scores.ranks
        if scores.topk_ids is not None:
            width, used = self.capacity.topk_width, scores.topk_ids.shape[1]
            arrays["prompt_topk_ids"][: rows * width].reshape(rows, width)[:, :used] = scores.topk_ids
            arrays["prompt_topk_logprobs"][: rows * width].reshape(rows, width)[:, :used] = scores.topk_logprobs

    def dump_logits(self, logits: torch.Tensor, names: list[str]) -> None:
        """Save each sampled row's raw float32 logits as `<logits_dump_dir>/<name>`."""
        rows = logits.cpu().numpy()
        for name, row in zip(names, rows, strict=True):
            np.save(os.path.join(self.logits_dump_dir, name), row)

    def output_frames(self, result: StepResult, header: StepRequest) -> list:
        """With the inline transport, rank 0 sends the sampled rows and prompt scores back in the reply."""
        if self.channel is None or self.rank != 0 or result.error:
            return []
        return self.channel.reply_frames(header)

    def close(self) -> None:
        """Unmap the master's arrays (the master owns and unlinks them)."""
        if self.channel is not None:
            self.channel.close()
        self.channel = None
        self.input_arrays, self.output_arrays = {}, {}


def serve_agent(
    config: Config, rank: int, keys: ChannelKeys, parent_pid: Optional[int] = None, bind: Optional[str] = None,
    device_id: Optional[int] = None, cpus: Optional[list[int]] = None,
) -> int:
    """Bind the agent's port (CURVE: only the master holding `keys.peer_public` gets in), load the model,
    then answer the master until told to stop. With `cpus`, keep to those cores, one torch thread each
    (unless serving_config.num_threads says otherwise)."""
    serving = config.serving_config
    if cpus:
        psutil.Process().cpu_affinity(cpus)  # before torch starts its threads: they inherit it
    if serving.num_threads or cpus:
        torch.set_num_threads(serving.num_threads or len(cpus))
    elif serving.world_size > 1 and serving.device == "cpu" and serving.transport == "shm":
        # ranks sharing this host's cores: a share each, not every rank a thread per core (oversubscribed, each
        # parallel op waits for threads the others' took the core from)
        torch.set_num_threads(max(1, len(psutil.Process().cpu_affinity()) // serving.world_size))
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 1000)
    authenticator = secure_server(context, socket, keys)
    address = f"tcp://{bind or serving.agent_host(rank)}:{serving.agent_ports[rank]}"
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        logger.error("agent %d cannot listen on %s: %s", rank, address, exc)
        authenticator.stop()
        context.destroy(linger=0)
        return EXIT_BAD_PORT
    try:
        try:
            worker = Worker(config, rank, device_id)
        except Exception as exc:  # any load failure is reported to the master, then we exit
            logger.error("agent %d failed to load the model: %s", rank, exc)
            _report_load_failure(socket, rank, f"{type(exc).__name__}: {exc}")
            return EXIT_LOAD_FAILED
        logger.info("agent %d ready on %s (%s)", rank, address, worker.device)
        socket.setsockopt(zmq.RCVTIMEO, PARENT_CHECK_MS)
        backlog: collections.deque = collections.deque()  # messages that came while a step waited for masks
        worker.mask_source = functools.partial(_receive_masks, socket, backlog)
        return _serve_loop(socket, worker, parent_pid, backlog)
    finally:
        authenticator.stop()
        context.destroy(linger=1000)


def _serve_loop(socket: zmq.Socket, worker: Worker, parent_pid: Optional[int], backlog: collections.deque) -> int:
    """Answer messages until Shutdown; anything that is not a well-formed message is logged and dropped."""
    try:
        while True:
            try:
                if backlog:
                    received_at, (identity, payload, *frames) = backlog.popleft()
                else:
                    identity, payload, *frames = socket.recv_multipart(copy=False)
                    received_at = time.perf_counter()
            except zmq.Again:  # nothing for PARENT_CHECK_MS: is the master still there?
                if parent_pid is not None and os.getppid() != parent_pid:
                    logger.error("agent %d: the master (pid %d) is gone; exiting", worker.rank, parent_pid)
                    return EXIT_MASTER_GONE
                continue
            except ValueError:  # a message of one frame: the peer's identity and nothing else
                continue
            try:
                message = decode(payload.bytes)
            except ProtocolError as exc:
                logger.warning("agent %d: dropped a message that does not decode: %s", worker.rank, exc)
                continue
            if isinstance(message, Shutdown):
                return 0
            try:
                reply = _handle(worker, message, frames)
            except MasterShutdown:
                return 0
            if reply is None:
                continue
            extra = []
            if isinstance(reply, StepResult):
                extra = worker.output_frames(reply, message)
                reply.received_at, reply.replied_at = received_at, time.perf_counter()
            socket.send_multipart([identity, encode(reply), *extra])
    finally:
        worker.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _receive_masks(socket: zmq.Socket, backlog: collections.deque, header: StepRequest, timeout: float) -> np.ndarray:
    """The words of `header`'s StepMasks, the next message the master sends (those of a step refused before
    are dropped); MasterShutdown on a Shutdown; ProtocolError after `timeout` s, or on any other message, which
    is kept in `backlog` for the serve loop to answer next."""
    deadline = time.monotonic() + timeout
    while True:
        try:  # they are usually here already: made while the forward ran
            message_frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            received_at = time.perf_counter()
            _, payload, *_ = message_frames
        except zmq.Again:
            left_ms = (deadline - time.monotonic()) * 1e3
            if left_ms <= 0 or not socket.poll(left_ms):
                raise ProtocolError(f"step {header.step_id}'s token masks did not come within {timeout:g} s") from None
            continue
        except ValueError:  # a message of one frame
            continue
        message = decode(payload.bytes)
        if isinstance(message, Shutdown):
            raise MasterShutdown()
        if isinstance(message, StepMasks) and message.step_id < header.step_id:
            continue
        if not isinstance(message, StepMasks) or message.step_id != header.step_id:
            backlog.append((received_at, message_frames))
            raise ProtocolError(f"step {header.step_id} waited for its token masks and got a {type(message).__name__} "
                                "(answered next)")
        return np.frombuffer(message.masks, dtype=np.int32)


def _handle(worker: Worker, message, frames: list) -> Optional[AgentReady | StepResult | AgentFailed]:
    """The reply to one message, or None when it is dropped."""
    if isinstance(message, StepRequest):
        try:
            return worker.step(message, frames)
        except MasterShutdown:
            raise
        except ProtocolError as exc:
            worker.timer.reset()
            worker.all_reduce_timer.take()  # a step refused after its forward (its masks did not come)
            logger.warning("agent %d: refused step %d: %s", worker.rank, message.step_id, exc)
            return StepResult(message.step_id, worker.rank, error=f"the agent refused the step: {exc}")
        except Exception:  # the step fails, the agent lives on; the master fails that step's requests
            worker.timer.reset()
            worker.all_reduce_timer.take()
            logger.exception("agent %d: step %d failed", worker.rank, message.step_id)
            return StepResult(message.step_id, worker.rank, error=traceback.format_exc(limit=3))
    if isinstance(message, InitAgent):
        try:
            return worker.attach(message)
        except (OSError, ValueError, MemoryError) as exc:  # no such segment, or sizes that cannot be
            return AgentFailed(worker.rank, f"cannot attach the step arrays: {type(exc).__name__}: {exc}")
    if isinstance(message, StepMasks):  # of a step refused before it waited for them
        logger.debug("agent %d: dropped the token masks of step %d", worker.rank, message.step_id)
        return None
    logger.warning("agent %d: dropped a %s message, which agents do not take", worker.rank, type(message).__name__)
    return None


def _report_load_failure(socket: zmq.Socket, rank: int, reason: str) -> None:
    """Answer the master's InitAgent (if it arrives soon) with the reason, so it need not guess."""
    if socket.poll(5000):
        identity = socket.recv_multipart()[0]
        socket.send_multipart([identity, encode(AgentFailed(rank, reason))])


def main(
    config: Config, rank: int, keys: ChannelKeys, parent_pid: Optional[int], bind: Optional[str] = None,
    device_id: Optional[int] = None, cpus: Optional[list[int]] = None,
) -> None:
    code = serve_agent(config, rank, keys, parent_pid, bind, device_id, cpus)
    # All the agent shares is released by now (arrays unmapped, sockets closed, process group left). Python's own
    # teardown of torch and its thread pools takes another second here, which every stop and restart would wait.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
