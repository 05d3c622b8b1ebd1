"""`llmserve serve`: launch the agents, wait for them, serve HTTP, and clean up on exit."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn

from llmserve.common.config import Config
from llmserve.common.errors import AgentFailure, ConfigError
from llmserve.common.model_info import check_tensor_parallel, model_info, read_hf_config
from llmserve.common.step_arrays import StepCapacity
from llmserve.master.agent_group import AgentGroup
from llmserve.master.api import create_app
from llmserve.master.chat_template import ChatTemplate, load_chat_template
from llmserve.master.engine import Engine
from llmserve.master.structured import mask_width
from llmserve.master.tokenizer import load_tokenizer
from llmserve.master.tokenizer_checks import check_tokenizer

logger = logging.getLogger("llmserve.master")


def serve(config: Config) -> int:
    """Run the server until SIGINT/SIGTERM; return the process exit code."""
    serving = config.serving_config
    try:
        _check_port_free(serving.server_ip, serving.server_port)
        tokenizer = load_tokenizer(config.model_config)
        hf_config = read_hf_config(config.model_config)
        info = model_info(config.model_config, hf_config)
        for warning in check_tokenizer(tokenizer, config.model_config, hf_config, info):
            logger.warning("%s", warning)
        _check_world_size(hf_config, serving.world_size)
        chat_template = load_chat_template(config.model_config)
        agents = AgentGroup(config, step_capacity(config, info.max_seq_len, len(info.eos_token_ids), info.vocab_size))
    except (ConfigError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("chat template: %s", chat_template.source)
    if config.model_config.load_format == "dummy":
        logger.warning(
            "the model has random weights (load_format: dummy), so its text is gibberish; to serve a real model: "
            "llmserve serve /path/to/checkpoint (a Hugging Face directory: config.json, *.safetensors, "
            "tokenizer.json or tokenizer.model)"
        )
    return asyncio.run(_serve(config, tokenizer, info, chat_template, agents))


def step_capacity(config: Config, max_seq_len: int, num_end_tokens: int = 1, vocab_size: int = 0) -> StepCapacity:
    """The largest step the scheduler can plan, which sizes the shared memory."""
    sched = config.scheduler_config
    limits = config.serving_config.sampling_limits
    return StepCapacity(
        max_num_tokens=sched.max_num_batched_tokens,
        max_num_seqs=sched.decode_batch_size,
        max_blocks_per_seq=-(-max_seq_len // config.pa_config.block_size),
        history_capacity=min(sched.decode_batch_size * max_seq_len, MAX_HISTORY_TOKENS),  # verified rows share
        topk_width=max(limits.max_logprobs, limits.max_num_beams * max(2, 1 + num_end_tokens), 1),
        suppress_width=num_end_tokens + limits.max_stop_token_ids,
        max_num_rows=sched.decode_batch_size * config.speculative_config.rows_per_seq,
        draft_width=config.speculative_config.num_speculative_tokens if config.speculative_config.method == "draft" else 0,
        mask_width=mask_width(vocab_size),
    )


MAX_HISTORY_TOKENS = 1 << 24  # 64 MiB of token ids for the rows that need penalties, per step


async def _serve(config: Config, tokenizer, info, chat_template: ChatTemplate, agents: AgentGroup) -> int:
    serving = config.serving_config
    engine = Engine(config, tokenizer, info, agents.connect(), restart=agents.restart)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not await _first(engine.start(), stop.wait()):
            logger.info("stopped before the agents were ready")
            return 0
        logger.info("agents ready; serving '%s' on http://%s:%d", config.model_config.model_name, serving.server_ip, serving.server_port)
        server = _QuietSignalsServer(
            uvicorn.Config(create_app(engine, chat_template), host=serving.server_ip, port=serving.server_port, log_level="warning")
        )
        serve_task = asyncio.ensure_future(server.serve())
        stop_task = asyncio.ensure_future(stop.wait())
        await asyncio.wait([serve_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        logger.info("shutting down")
        await engine.stop()  # in-flight requests end with an error, so their connections close
        server.should_exit = True
        await serve_task
        return 0
    except AgentFailure as exc:
        logger.error("%s", exc)
        return 1
    finally:
        await engine.stop()
        await agents.stop()


async def _first(main, stopper) -> bool:
    """Run `main` until it ends or `stopper` fires; True if `main` ended first."""
    main_task = asyncio.ensure_future(main)
    stop_task = asyncio.ensure_future(stopper)
    await asyncio.wait([main_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if main_task.done():
        main_task.result()
        return True
    main_task.cancel()
    await asyncio.gather(main_task, return_exceptions=True)
    return False


class _QuietSignalsServer(uvicorn.Server):
    """uvicorn without its own signal handling: the launcher owns SIGINT/SIGTERM."""

    def capture_signals(self):
        return contextlib.nullcontext()


def _check_world_size(hf_config: dict, world: int) -> None:
    try:
        check_tensor_parallel(hf_config, world)
    except ValueError as exc:
        raise ConfigError(f"serving_config.agent_ports / tensor_parallel_size: {exc}") from exc


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"serving_config.server_port: cannot listen on {host}:{port}: {exc.strerror}") from exc
