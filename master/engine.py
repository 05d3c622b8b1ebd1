"""The engine: request registry and the step loop, in the server's asyncio loop."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Optional

import numpy as np
from tokenizers import Tokenizer

from llmserve.common.config import Config
from llmserve.common.errors import AgentFailure, Overloaded, RequestError
from llmserve.common.model_info import ModelInfo
from llmserve.common.protocol import AgentReady, StepRequest, StepResult
from llmserve.common.sampling import ParamNames, SamplingParams
from llmserve.common.step_arrays import STEP_BUFFERS, step_outputs
from llmserve.common.timers import StageTimer, own_ms
from llmserve.master.agent_client import Transport
from llmserve.master.agent_group import RestartPolicy
from llmserve.master.block_manager import BlockManager
from llmserve.master.metrics import Metrics, StatsLine
from llmserve.master.beam_search import BeamSearch
from llmserve.master.processes import ProcessWatch
from llmserve.master.outputs import GenerationOutput, TextOutput, sequence_output
from llmserve.master.groups import BeamGroup
from llmserve.master.scheduler import PromptScores, Scheduler, StepOutcome, StepPlan, StepSamples
from llmserve.master.sequence import FinishReason, Sequence, TokenLogprobs
from llmserve.master.speculative import Speculator
from llmserve.master.step_builder import late_masks, write_step
from llmserve.master.structured import GrammarCompiler
from llmserve.master.text_worker import TextWorker
from llmserve.master.tokenizer import output_texts

logger = logging.getLogger("llmserve.master")

AGENT_WATCH_INTERVAL = 0.5


@dataclass
class TokenEvent:
    """The tokens one step added to output `index` (several when speculative decoding accepted proposals), with
    the text each completed (may be empty)."""

    token_ids: list[int]
    texts: list[str]
    index: int = 0
    logprobs: Optional[list[TokenLogprobs]] = None  # one per token, when the request asked for them
    finish_reason: Optional[str] = None  # set when the last token ends its sequence

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass
class FinishEvent:
    """The request is over; `error` is set when it failed."""

    reason: FinishReason
    error: Optional[str] = None


@dataclass
class Flight:
    """A step sent to the agents whose result the master has not read yet."""

    plan: StepPlan
    header: StepRequest
    start: float  # time.perf_counter() when planning it began
    sent_at: float = 0.0
    ahead: bool = False  # planned while the step before was in flight (overlapped scheduling)
    failure: Optional[str] = None  # it could not be built, so it was never sent


@dataclass(eq=False)
class RequestHandle:
    """A request as the API sees it: its sequences (one per sample or beam) and a queue of events."""

    request_id: str
    seq: Sequence  # the first sequence; the others are forked from it
    wants_tokens: bool  # token events wanted; else only the finish event
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    start_time: float = 0.0
    first_token_time: Optional[float] = None
    end_time: Optional[float] = None
    seqs: list[Sequence] = field(default_factory=list)
    texts: dict[int, TextOutput] = field(default_factory=dict)  # seq_id -> text, when streamed or stop strings
    outputs: list[GenerationOutput] = field(default_factory=list)  # set when finished

    def __post_init__(self) -> None:
        self.seqs = [self.seq]

    @property
    def is_finished(self) -> bool:
        return self.end_time is not None

    @property
    def num_output_tokens(self) -> int:
        return sum(seq.num_output_tokens for seq in self.seqs)

    async def stream(self) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Yield events until the finish event (included)."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, FinishEvent):
                return


class Engine:
    """Owns the scheduler and the transport; the API submits requests and reads their events."""

    def __init__(
        self, config: Config, tokenizer: Tokenizer, model: ModelInfo, transport: Transport,
        restart: Optional[Callable[[Transport], Awaitable[Transport]]] = None,
    ):
        """`restart` replaces the transport of dead agents with one to fresh agents; without it a death is final."""
        self.config = config
        self.tokenizer = tokenizer
        self.model = model
        self.transport = transport
        self.seq_ids = itertools.count()
        self.block_manager: Optional[BlockManager] = None  # sized by what the agents allocated (start)
        self.scheduler: Optional[Scheduler] = None
        self.limits = config.serving_config.sampling_limits
        self.suppress_width = transport.capacity.suppress_width
        self.grammars = GrammarCompiler(tokenizer.to_str(), model.vocab_size, model.eos_token_ids)
        self.handles: dict[int, RequestHandle] = {}  # seq id -> its request
        self.step_ids = itertools.count()
        self.wakeup = asyncio.Event()
        self.timer = StageTimer()
        self.metrics = Metrics(self.stats)
        self.stats_line = StatsLine(config.serving_config.stats_log_interval)
        self.loop_task: Optional[asyncio.Task] = None
        self.watch_task: Optional[asyncio.Task] = None
        self.failure: Optional[str] = "the agents are not ready yet"
        self.is_stopped = False
        serving = config.serving_config
        self.restart = restart
        self.restart_policy = RestartPolicy(serving.agent_restart_limit, serving.agent_restart_window, serving.agent_restart_backoff)
        self.recovery_task: Optional[asyncio.Task] = None
        self.num_agent_restarts = 0
        self.trace_file = None  # opened in start(), so a bad path fails where stop() cleans up
        self.request_id_of = self._request_id_of if config.serving_config.logits_dump_dir else None
        self.text_worker = TextWorker(tokenizer, model.max_seq_len)
        self.processes = ProcessWatch()
        self.kernels: dict[str, str] = {}  # what the agents compute with, as rank 0 reports it
        self.last_recorded = 0.0  # time.perf_counter() when the last step was recorded
        self.last_landed = 0.0  # when the last step's result was read
        self.overlap = config.scheduler_config.overlap_scheduling  # a benchmark may switch it between requests
        self.last_replied = 0.0  # when the agent answered it (the agent's clock: the same on one host)

    async def start(self) -> None:
        """Wait for the agents, then start the step loop."""
        trace_path = self.config.serving_config.step_trace_path
        if trace_path:
            self.trace_file = open(trace_path, "a", buffering=1)
        self._adopt_agents(await self.transport.start(self.config.serving_config.agent_start_timeout))
        self.failure = None
        self._start_loops()

    def _adopt_agents(self, readies: list[AgentReady]) -> None:
        """Check the agents serve this model, size the block manager by the blocks they allocated (the fewest),
        and watch the processes of those on this host."""
        if self.config.serving_config.transport == "shm":  # shared memory: every agent runs on this host
            self.processes.set_agents({ready.rank: ready.pid for ready in readies})
        pa, model_config = self.config.pa_config, self.config.model_config
        for ready in readies:
            for what, theirs, ours in (("vocabulary size", ready.vocab_size, self.model.vocab_size),
                                       ("block size", ready.block_size, pa.block_size),
                                       ("dtype", ready.dtype, model_config.model_dtype)):
                if theirs != ours:
                    raise AgentFailure(f"agent {ready.rank} has {what} {theirs} where this master has {ours}: "
                                       "start the master and its agents from the same config")
        self.kernels = readies[0].kernels
        logger.info("kernels: %s", ", ".join(f"{part}: {what}" for part, what in self.kernels.items()) or "unknown")
        num_blocks = min(ready.num_kv_blocks for ready in readies)
        if self.block_manager is not None and self.block_manager.num_blocks == num_blocks:
            self.block_manager.reset_cache()  # restarted agents' pools are new: no cached block holds anything now
            return
        previous = self.block_manager
        # empty, its cache too: no request is in flight now
        self.block_manager = BlockManager(num_blocks, pa.block_size, self.config.scheduler_config.enable_prefix_caching)
        if previous is not None:  # counters only go up
            self.block_manager.num_queried_tokens = previous.num_queried_tokens
            self.block_manager.num_hit_tokens = previous.num_hit_tokens
        previous_scheduler = self.scheduler
        speculator = previous_scheduler.speculator if previous_scheduler is not None else self._speculator()
        self.scheduler = Scheduler(self.config.scheduler_config, self.block_manager, self.seq_ids.__next__, speculator)
        if previous_scheduler is not None:  # counters only go up
            self.scheduler.num_preemptions = previous_scheduler.num_preemptions
        num_tokens = num_blocks * pa.block_size
        logger.info(
            "KV cache (%s): %d blocks of %d tokens = %d tokens (%.2f GiB per agent), %.1f sequences of the longest %d tokens",
            pa.kv_cache_dtype, num_blocks, pa.block_size, num_tokens, max(r.kv_cache_bytes for r in readies) / 2**30,
            num_tokens / self.model.max_seq_len, self.model.max_seq_len,
        )

    def _speculator(self) -> Optional[Speculator]:
        spec = self.config.speculative_config
        if not spec.enabled:
            return None
        logger.info("speculative decoding: %s, up to %d tokens per step%s", spec.method, spec.num_speculative_tokens,
                    f" (n-grams of {spec.prompt_lookup_min}-{spec.prompt_lookup_max})" if spec.method == "ngram" else "")
        return Speculator(spec)

    def _start_loops(self) -> None:
        self.loop_task = asyncio.create_task(self._run(), name="llmserve-step-loop")
        self.watch_task = asyncio.create_task(self._watch_agents(), name="llmserve-agent-watch")

    async def _watch_agents(self) -> None:
        """Notice an agent that dies while no step is in flight."""
        while self.failure is None:
            reason = self.transport.failure()
            if reason is not None:
                self.loop_task.cancel()
                self._fail_everything(reason)
                return
            await asyncio.sleep(AGENT_WATCH_INTERVAL)

    @property
    def is_healthy(self) -> bool:
        return self.failure is None and self.transport.failure() is None

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, stream: bool = True,
        names: ParamNames = ParamNames(), cache_salt: Optional[str] = None,
    ) -> RequestHandle:
        """Queue a request; raise RequestError, Overloaded or AgentFailure if it cannot be. `cache_salt`: its
        prompt shares prefix-cache blocks only with requests of the same salt.

        Without `stream` the handle gets only the finish event: no per-token work is done for it.
        Errors name the parameter as the client's API spells it (`names`).
        """
        if not self.is_healthy:
            raise AgentFailure(f"the server cannot serve: {self.failure or self.transport.failure()}")
        self._check_params(params, stream, names)
        self._check_fits(prompt_ids, params, names)
        if self.scheduler.num_unfinished >= self.config.scheduler_config.max_queue_size:
            raise Overloaded(f"{self.scheduler.num_unfinished} requests are in flight; retry later")
        now = time.monotonic()
        seq = Sequence(
            seq_id=next(self.seq_ids),
            prompt_ids=prompt_ids,
            params=params,
            eos_token_ids=frozenset(self.model.eos_token_ids),
            max_seq_len=self.model.max_seq_len,
            arrival_time=now,
            cache_salt=cache_salt,
        )
        if params.structured is not None:
            seq.matcher = self.grammars.matcher(params.structured)
        if params.is_beam_search:
            search = BeamSearch(
                params.num_beams, params.length_penalty, params.early_stopping, params.max_new_tokens,
                self._end_token_ids(params),
            )
            seq.beam = BeamGroup(search, [seq], {seq.seq_id: np.float32(0.0)})
        else:
            seq.pending_forks = params.num_samples - 1
        handle = RequestHandle(request_id, seq, stream, start_time=now)
        self._track(handle, seq)
        self.scheduler.add(seq)
        self.wakeup.set()
        return handle

    async def prepare(self, params: SamplingParams) -> None:
        """What a request needs before `submit`, done off the event loop: its structured-output constraint
        compiled (RequestError when it is refused)."""
        if params.structured is not None:
            await self.grammars.prepare(params.structured)

    def _check_params(self, params: SamplingParams, stream: bool, names: ParamNames) -> None:
        params.validate(self.limits, names)
        if params.structured is not None:
            name = params.structured.name
            if params.is_beam_search:
                raise RequestError(f"{name}: a constraint cannot be combined with beam search", name)
            if params.min_new_tokens:
                raise RequestError(f"{name}: a constraint cannot be combined with {names('min_new_tokens')} (the "
                                   "grammar decides where the output ends)", name)
        vocab_size = self.model.vocab_size
        outside = [i for i in params.stop_token_ids if i >= vocab_size]
        if outside:
            raise RequestError(
                f"{names('stop_token_ids')}: {outside[0]} is not a token id of this model (0 to {vocab_size - 1})",
                names("stop_token_ids"),
            )
        if stream and (params.is_beam_search or params.num_samples > params.n):
            raise RequestError(
                "stream: beam search and best_of > n pick their outputs at the end; they cannot stream", "stream"
            )
        if params.is_beam_search:
            num_end = len(self._end_token_ids(params))
            if max(2, 1 + num_end) * params.num_beams > self.transport.capacity.topk_width:
                raise RequestError(
                    f"{names('stop_token_ids')}: beam search keeps (1 + end tokens) x num_beams candidates per beam; "
                    f"{num_end} end tokens with {params.num_beams} beams exceed the {self.transport.capacity.topk_width} "
                    "the server returns (serving_config.max_num_beams sizes it)", names("stop_token_ids"),
                )
        batch = self.config.scheduler_config.decode_batch_size
        if params.num_samples > batch:
            raise RequestError(f"{names('n')}: {params.num_samples} sequences exceed the decode batch size ({batch})", names("n"))

    def _end_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """Tokens that end a beam: the model's end tokens and the request's stop_token_ids."""
        return frozenset(self.model.eos_token_ids) | frozenset(params.stop_token_ids)

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams, names: ParamNames) -> None:
        total = len(prompt_ids) + params.max_new_tokens
        if not prompt_ids:
            raise RequestError(f"{names.prompt}: the prompt is empty", names.prompt)
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.model.vocab_size:
            bad = next(i for i in prompt_ids if not 0 <= i < self.model.vocab_size)
            raise RequestError(
                f"{names.prompt}: {bad} is not a token id of this model (0 to {self.model.vocab_size - 1})", names.prompt
            )
        if total > self.model.max_seq_len:
            raise RequestError(
                f"{names.prompt}: the prompt has {len(prompt_ids)} tokens and {names('max_new_tokens')} is "
                f"{params.max_new_tokens}; together they exceed the model's maximum of {self.model.max_seq_len} tokens",
                names.prompt,
            )
        blocks = self.block_manager
        if not self._fits_in_cache(len(prompt_ids), params.max_new_tokens, params.num_samples):
            raise RequestError(
                f"{names.prompt}: {total} tokens x {params.num_samples} sequences need more KV blocks than the whole "
                f"cache holds ({blocks.num_blocks} blocks of {blocks.block_size})", names.prompt,
            )

    def _track(self, handle: RequestHandle, seq: Sequence) -> None:
        """Route `seq`'s tokens to `handle`."""
        self.handles[seq.seq_id] = handle
        if seq is not handle.seq:
            handle.seqs.append(seq)
        if handle.wants_tokens or seq.params.stop:
            handle.texts[seq.seq_id] = TextOutput(self.tokenizer, seq)

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request now (client gone); its blocks return to the pool."""
        if handle.is_finished:
            return
        for seq in handle.seqs:
            self.scheduler.abort(seq)
        self._finish(handle, FinishReason.ABORT)

    def withdraw(self, handle: RequestHandle) -> None:
        """Take back a request whose client was refused after all (another prompt of its batch failed).

        Frees what abort frees, but counts and logs nothing: for the client it never existed.
        """
        for seq in handle.seqs:
            self.scheduler.abort(seq)
            self.handles.pop(seq.seq_id, None)
        handle.end_time = time.monotonic()

    def _fits_in_cache(self, num_prompt_tokens: int, num_new: int, num_samples: int) -> bool:
        """The request's samples, grown to `num_new` tokens each, fit in the whole KV cache (sharing the prompt)."""
        blocks = self.block_manager
        needed = blocks.blocks_for(num_prompt_tokens + num_new) + (num_samples - 1) * (blocks.blocks_for(num_new) + 1)
        return needed <= blocks.num_blocks

    def room_for_output(self, num_prompt_tokens: int, num_samples: int) -> int:
        """The most new tokens a request may ask for: within the context, and within the whole KV cache."""
        low, high = 0, self.model.max_seq_len - num_prompt_tokens
        while low < high:  # the largest that fits; fitting only turns false as the count grows
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self._fits_in_cache(num_prompt_tokens, middle, num_samples) else (low, middle - 1)
        return low

    @property
    def overlaps(self) -> bool:
        """Whether a step may be planned and sent while the one before runs (scheduler_config.overlap_scheduling,
        with a transport whose agents take the sampled tokens of a step as the next one's input)."""
        return self.overlap and self.transport.can_overlap

    async def _run(self) -> None:
        """The step loop. With overlapped scheduling, while step N runs the master plans and sends step N+1
        (when every sequence of N goes on by itself: Scheduler.may_look_ahead), then reads N's result; the
        agent finds N+1 waiting when N is done, so the master's work and the round trip leave the step's
        critical path."""
        flight: Optional[Flight] = None
        failed = False  # the last step landed failed: what follows it may be refused, so the next plan waits
        try:
            while True:
                if flight is None:
                    start = time.perf_counter()
                    plan = self._next_plan()
                    if plan is None:
                        self.timer.reset()
                        self.stats_line.idle(time.monotonic())
                        await self._sleep_until_work()
                        continue
                    flight = await self._launch(plan, start)
                following = None
                if self.overlaps and flight.failure is None and not failed and self.scheduler.may_look_ahead(flight.plan):
                    start = time.perf_counter()
                    plan = self._next_plan(ahead=True)
                    if plan is not None:
                        following = await self._launch(plan, start, after=flight)
                outcome, agent_ms = await self._land(flight)
                failed = flight.failure is not None
                if following is not None and following.header.masks_follow and following.failure is None:
                    await self._send_masks(following)
                self._emit(outcome)
                self._record_step(flight, outcome, agent_ms)
                self._log_stats()
                flight = following
        except AgentFailure as exc:
            self._fail_everything(str(exc))
        except Exception as exc:
            logger.exception("the step loop crashed")
            self._fail_everything(f"internal error: {exc}")
            raise

    def _next_plan(self, ahead: bool = False) -> Optional[StepPlan]:
        """The next step's plan; `ahead`: while the step before is in flight (no proposals then)."""
        with self.timer.stage("schedule"):
            plan = self.scheduler.schedule(time.monotonic(), ahead)
        if plan is not None and self.scheduler.speculator is not None:
            with self.timer.stage("propose"):
                if ahead:
                    self.scheduler.pass_drafts(plan)
                else:
                    self.scheduler.add_drafts(plan)
        return plan

    async def _sleep_until_work(self) -> None:
        self.wakeup.clear()
        wake_at = self.scheduler.next_wakeup(time.monotonic())
        timeout = None if wake_at is None else max(wake_at - time.monotonic(), 0.0005)
        try:
            await asyncio.wait_for(self.wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _launch(self, plan: StepPlan, start: float, after: Optional[Flight] = None) -> Flight:
        """Build `plan`'s step in the next pair of step buffers and send it; `after`: the step in flight that
        this one follows (its placeholders name that step's sampled rows)."""
        step_id = next(self.step_ids)
        buffer = step_id % STEP_BUFFERS
        try:
            with self.timer.stage("build"):
                capacity = self.transport.capacity
                header = write_step(plan, self.transport.inputs[buffer], self.block_manager.block_size, step_id,
                                    self.request_id_of, self.suppress_width, capacity.draft_width, capacity.mask_width,
                                    masks_follow=after is not None)
        except (ValueError, OverflowError, IndexError) as exc:  # a request the checks let through; never the whole engine
            logger.exception("could not build step %d", step_id)
            empty = StepRequest(step_id=step_id, num_tokens=0, num_seqs=0, num_sample=0, num_new_blocks=0, is_all_greedy=True)
            return Flight(plan, empty, start, failure=f"building the step failed: {exc}")
        header.buffer = buffer
        if after is not None and any(item.seq.num_pending for item in plan.scheduled):  # placeholders of `after`'s rows
            header.follows_step = after.header.step_id
        self.scheduler.launch(plan)
        flight = Flight(plan, header, start, time.perf_counter(), ahead=after is not None)
        await self.transport.send(header)
        return flight

    async def _land(self, flight: Flight) -> tuple[StepOutcome, dict]:
        """Read a step's result and apply it (a step that failed fails its requests, and gets `failure` set)."""
        if flight.failure is not None:
            return self._fail_step(flight.plan, flight.failure), {}
        waited_at = time.perf_counter()
        result = await self.transport.receive(flight.header)
        landed_at = time.perf_counter()
        self._add_ipc_times(flight, waited_at, landed_at, result)
        self.last_replied, self.last_landed = result.replied_at, landed_at
        if result.error:
            flight.failure = result.error
            return self._fail_step(flight.plan, result.error), result.timings_ms
        with self.timer.stage("update"):
            outcome = self.scheduler.update(flight.plan, self._samples(flight.header), time.monotonic())
        return outcome, result.timings_ms

    async def _send_masks(self, flight: Flight) -> None:
        """The token masks of a step planned ahead, now that the step before has landed: its constrained
        sequences' grammar states have taken the tokens it sampled. The agent runs the forward meanwhile."""
        with self.timer.stage("masks"):
            masks = late_masks(flight.plan, self.transport.capacity.mask_width)
        await self.transport.send_masks(flight.header, masks)

    def _add_ipc_times(self, flight: Flight, waited_at: float, landed_at: float, result: StepResult) -> None:
        """The round trip less the agent's stages: split into out, agent loop and back when the clocks agree.
        A step planned ahead counts only what the step before did not hide: the way out from when the agent
        could take it (it had answered the step before), the way back from when the master waited for it."""
        timer = self.timer
        ready_at = max(flight.sent_at, self.last_replied) if flight.ahead else flight.sent_at
        out_ms = (result.received_at - ready_at) * 1e3
        back_ms = (landed_at - max(result.replied_at, waited_at if flight.ahead else 0.0)) * 1e3
        if result.received_at and out_ms >= 0 and back_ms >= 0:
            timer.add("ipc_out", out_ms)
            timer.add("agent_loop", (result.replied_at - result.received_at) * 1e3 - own_ms(result.timings_ms))
            timer.add("ipc_back", back_ms)
        else:  # an in-process agent, or one on another host whose clock differs
            since = max(flight.sent_at, self.last_landed) if flight.ahead else flight.sent_at
            timer.add("ipc", (landed_at - since) * 1e3 - own_ms(result.timings_ms))

    def _samples(self, header: StepRequest) -> StepSamples:
        """Views of the agent's answer for the step's sampled rows and scored prompt positions."""
        out = step_outputs(self.transport.outputs[header.buffer], header, self.transport.capacity.topk_width)
        prompt = None
        if header.num_prompt_positions:
            prompt = PromptScores(out.prompt_logprobs, out.prompt_ranks, out.prompt_topk_ids, out.prompt_topk_logprobs)
        return StepSamples(out.sampled_ids, out.sampled_logprobs, out.topk_ids, out.topk_logprobs, prompt, out.draft_ids)

    def _request_id_of(self, seq_id: int) -> str:
        return self.handles[seq_id].request_id

    def _fail_step(self, plan: StepPlan, error: str) -> StepOutcome:
        """A step failed to build or raised on the agent: fail its requests, keep serving the rest."""
        self.block_manager.release_again(plan.released)
        logger.error("step failed; failing its %d requests: %s", len(plan.scheduled), error)
        for item in plan.scheduled:
            handle = self.handles.get(item.seq.seq_id)
            if handle and not handle.is_finished:
                for seq in handle.seqs:
                    self.scheduler.abort(seq, FinishReason.ERROR)
                self._finish(handle, FinishReason.ERROR, "the model failed on this request's step")
        return StepOutcome(new_tokens=[], finished=[])

    def _emit(self, outcome: StepOutcome) -> None:
        with self.timer.stage("detokenize"):
            now = time.monotonic()
            for parent, child in outcome.forked:
                self._track(self.handles[parent.seq_id], child)
            finished = list(outcome.finished)
            events: dict[int, TokenEvent] = {}  # seq id -> the event of its tokens in this step
            num_new: dict[int, int] = {}  # seq id -> its tokens in this step (several when proposals were accepted)
            for seq, _ in outcome.new_tokens:
                num_new[seq.seq_id] = num_new.get(seq.seq_id, 0) + 1
            for seq, token_id in outcome.new_tokens:
                handle = self.handles[seq.seq_id]
                if handle.first_token_time is None:
                    self._first_token(handle, now)
                text = handle.texts.get(seq.seq_id)
                if text is None:
                    continue
                if num_new[seq.seq_id] == 0:
                    continue  # cut off by a stop string earlier in this step
                num_tokens = seq.num_settled - num_new[seq.seq_id] + 1  # the sequence up to this token
                num_new[seq.seq_id] -= 1
                delta = text.add(seq, num_tokens)
                if text.stopped:
                    seq.truncate(num_tokens)
                    outcome.num_dropped += num_new[seq.seq_id]
                    num_new[seq.seq_id] = 0
                    if not seq.is_finished:
                        self.scheduler.abort(seq, FinishReason.STOP)
                        finished.append(seq)
                    seq.finish_reason = FinishReason.STOP
                if handle.wants_tokens:
                    self._add_to_event(events, seq, token_id, delta, num_tokens)
            for seq_id, event in events.items():
                self.handles[seq_id].events.put_nowait(event)
            for seq in finished:
                handle = self.handles.get(seq.seq_id)
                if handle is not None and not handle.is_finished and all(s.is_finished for s in handle.seqs):
                    if handle.first_token_time is None:  # a beam search whose every beam ended at its first step
                        self._first_token(handle, now)
                    handle.outputs = self._outputs(handle)
                    self._finish(handle, FinishReason(handle.outputs[0].finish_reason))

    @staticmethod
    def _add_to_event(events: dict[int, TokenEvent], seq: Sequence, token_id: int, text: str, num_tokens: int) -> None:
        """Add token `num_tokens` - 1 of `seq` (which completed `text`) to its event of this step."""
        event = events.get(seq.seq_id)
        if event is None:
            event = events[seq.seq_id] = TokenEvent([], [], seq.sample_index)
        event.token_ids.append(token_id)
        event.texts.append(text)
        output_index = num_tokens - seq.num_prompt_tokens - 1
        if 0 <= output_index < len(seq.logprobs):
            if event.logprobs is None:
                event.logprobs = []
            event.logprobs.append(seq.logprobs[output_index])
        if seq.is_finished and num_tokens == seq.num_settled:
            event.finish_reason = seq.finish_reason.value

    def _outputs(self, handle: RequestHandle) -> list[GenerationOutput]:
        """The n sequences returned: all samples, the best_of with the highest log-probability, or the best beams."""
        params = handle.seq.params
        if handle.seq.beam is not None:
            return [
                GenerationOutput(i, h.output_ids, None, h.finish_reason, score=h.score)
                for i, h in enumerate(handle.seq.beam.search.results(params.n))
            ]
        seqs = sorted(handle.seqs, key=lambda seq: seq.sample_index)
        if params.num_samples > params.n:
            seqs = sorted(seqs, key=lambda seq: -seq.cumulative_logprob)[: params.n]
        return [sequence_output(i, seq, handle.texts.get(seq.seq_id)) for i, seq in enumerate(seqs)]

    def _first_token(self, handle: RequestHandle, now: float) -> None:
        handle.first_token_time = now
        seq = handle.seq
        queued = (seq.first_scheduled_time or now) - seq.arrival_time
        self.metrics.on_first_token(seq.num_prompt_tokens, now - handle.start_time, queued)

    def _finish(self, handle: RequestHandle, reason: FinishReason, error: Optional[str] = None) -> None:
        for seq in handle.seqs:
            self.handles.pop(seq.seq_id, None)
        handle.end_time = time.monotonic()
        handle.events.put_nowait(FinishEvent(reason, error))
        self.metrics.on_finish(reason.value, handle.end_time - handle.start_time, time_per_output_token(handle))
        logger.info(json.dumps(request_record(handle, reason)))

    def _fail_everything(self, reason: str) -> None:
        """The agents cannot serve: fail every request now, then restart the agents if we may."""
        if self.failure is not None:
            return
        self.failure = reason
        logger.error("agents failed, failing %d requests: %s", self.scheduler.num_unfinished, reason)
        for task in (self.loop_task, self.watch_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        for seq in self.scheduler.fail_all():
            handle = self.handles.get(seq.seq_id)
            if handle and not handle.is_finished:
                self._finish(handle, FinishReason.ERROR, f"the model agent failed: {reason}")
        if self.restart is not None and not self.is_stopped:
            self.recovery_task = asyncio.create_task(self._recover(reason), name="llmserve-agent-restart")

    async def _recover(self, reason: str) -> None:
        """Replace the dead agents, within the restart budget, and serve again; /health says what happens meanwhile."""
        while (delay := self.restart_policy.next_delay(time.monotonic())) is not None:
            self.failure = f"restarting the agents (in {delay:g} s) after: {reason}"
            logger.warning("%s", self.failure)
            await asyncio.sleep(delay)
            try:
                self.transport = await self.restart(self.transport)
                self._adopt_agents(await self.transport.start(self.config.serving_config.agent_start_timeout))
            except (AgentFailure, OSError) as exc:
                reason = f"a restart failed: {exc}"
                logger.error("%s", reason)
                continue
            self.num_agent_restarts += 1
            self.failure = None
            self._start_loops()
            logger.info("agents restarted (%d so far); serving again", self.num_agent_restarts)
            return
        self.failure = f"{reason}; no restart left ({self.restart_policy.describe()}): restart the server"
        logger.error("%s", self.failure)

    def _record_step(self, flight: Flight, outcome: StepOutcome, agent_ms: dict) -> None:
        """Feed the step's stage timings to the metrics, and to the trace file when one is configured. A step's
        wall time runs from its planning, or from the step before's end when it was planned ahead, to the end
        of its update and streaming (the master stages timed since the step before's record count here)."""
        plan, header = flight.plan, flight.header
        master_ms = self.timer.reset()
        now = time.perf_counter()
        step_s = now - max(flight.start, self.last_recorded)
        self.last_recorded = now
        self.metrics.on_step(step_s, len(outcome.new_tokens) - outcome.num_dropped, master_ms, agent_ms)
        speculator = self.scheduler.speculator
        if speculator is not None and "draft" in agent_ms:
            proposed = sum(max(item.propose_count, 0) for item in plan.scheduled)
            speculator.observe_draft_model(agent_ms["draft"], proposed, step_s * 1e3)
        if self.trace_file is None:
            return
        record = {
            "step_id": header.step_id,
            "time": time.time(),
            "num_seqs": header.num_seqs,
            "num_tokens": header.num_tokens,
            "num_prefill_seqs": plan.num_prefill_seqs,
            "num_sampled": header.num_sample,
            "num_draft_tokens": sum(len(item.draft_ids) for item in plan.scheduled),
            "num_accepted": outcome.num_accepted,
            "overlapped": flight.ahead,
            "step_ms": step_s * 1e3,
            "master_ms": master_ms,
            "agent_ms": agent_ms,
        }
        self.trace_file.write(json.dumps(record) + "\n")

    def stats(self) -> dict:
        """Queue lengths (requests), KV-cache usage, agent restarts and processes right now."""
        return {
            **self.queue_stats(),
            "agent_restarts": self.num_agent_restarts,
            "processes": [dataclasses.asdict(process) for process in self.processes.stats()],
            "kernels": self.kernels,
        }

    def queue_stats(self) -> dict:
        """Queue lengths (requests), KV-cache usage and the prefix cache's counts right now (cheap)."""
        return {
            "num_running": self._num_requests(self.scheduler.running),
            "num_waiting": self._num_requests(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_blocks_total": self.block_manager.num_blocks,
            "kv_blocks_free": self.block_manager.num_free_blocks,
            "kv_cache_tokens": self.block_manager.num_blocks * self.block_manager.block_size,
            "kv_cache_dtype": self.config.pa_config.kv_cache_dtype,
            "prefix_cache_queries": self.block_manager.num_queried_tokens,
            "prefix_cache_hits": self.block_manager.num_hit_tokens,
            **(self.scheduler.speculator.stats() if self.scheduler.speculator is not None else {}),
        }

    def _log_stats(self) -> None:
        """Every serving_config.stats_log_interval seconds of activity: the periodic stats line."""
        now = time.monotonic()
        self.stats_line.busy(now)
        if not self.stats_line.due(now):
            return
        totals = {"prompt_tokens": self.metrics.num_prompt_tokens, "generation_tokens": self.metrics.num_generation_tokens}
        line = self.stats_line.line(now, {**self.queue_stats(), **totals})
        if line is not None:
            logger.info("%s", line)

    def _num_requests(self, seqs) -> int:
        """Requests among `seqs` (a request with n samples or beams counts once)."""
        return len({id(self.handles.get(seq.seq_id, seq)) for seq in seqs})

    def token_text(self, token_id: int) -> str:
        """One token's text, as shown next to its log-probability."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def decode_outputs(self, handle: RequestHandle) -> None:
        """Decode the outputs of a finished request that no one read token by token, on the text worker."""
        pending = [output for output in handle.outputs if output.text is None]
        if pending:
            ids = [output.output_ids for output in pending]
            texts = await self.text_worker.run(output_texts, self.tokenizer, handle.seq.prompt_ids, ids)
            for output, text in zip(pending, texts):
                output.text = text

    async def stop(self) -> None:
        """Stop the loop, fail what is left, stop the agents and free shared memory (idempotent)."""
        if self.is_stopped:
            return
        self.is_stopped = True
        self.failure = self.failure or "the server is shutting down"
        tasks = [t for t in (self.loop_task, self.watch_task, self.recovery_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for seq in self.scheduler.fail_all() if self.scheduler is not None else ():
            handle = self.handles.get(seq.seq_id)
            if handle and not handle.is_finished:
                self._finish(handle, FinishReason.ERROR, "the server is shutting down")
        await self.transport.close()
        self.text_worker.close()
        if self.trace_file is not None:
            self.trace_file.close()


def time_per_output_token(handle: RequestHandle) -> Optional[float]:
    """Seconds between tokens after the first, for the longest sequence; None with fewer than two tokens."""
    num_tokens = max(seq.num_output_tokens for seq in handle.seqs)
    if handle.first_token_time is None or num_tokens < 2:
        return None
    return (handle.end_time - handle.first_token_time) / (num_tokens - 1)


def request_record(handle: RequestHandle, reason: FinishReason) -> dict:
    """The per-request log line's fields (times in seconds since the request arrived)."""
    first = handle.first_token_time
    return {
        "request_id": handle.request_id,
        "prompt_tokens": handle.seq.num_prompt_tokens,
        "cached_tokens": handle.seq.num_cached_tokens,
        "output_tokens": handle.num_output_tokens,
        "finish_reason": reason.value,
        "first_token_time": None if first is None else round(first - handle.start_time, 6),
        "res_time": round(handle.end_time - handle.start_time, 6),
        "preemptions": handle.seq.num_preemptions,
    }
