"""The real master/agent path without HTTP, for offline batch runs and benchmarks."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

from llmserve.common.config import Config
from llmserve.common.errors import AgentFailure
from llmserve.common.model_info import model_info, read_hf_config
from llmserve.common.sampling import SamplingParams
from llmserve.master.agent_group import AgentGroup
from llmserve.master.engine import Engine, FinishEvent, RequestHandle
from llmserve.master.launcher import step_capacity
from llmserve.master.tokenizer import load_tokenizer


@dataclass
class OfflineOutput:
    """One prompt's generated ids and its times (seconds since it was submitted)."""

    output_ids: list[int]
    finish_reason: str
    first_token_time: Optional[float]
    res_time: float


class OfflineEngine:
    """Launches the agents and runs the engine's step loop in this process: `async with OfflineEngine(config) as llm`."""

    def __init__(self, config: Config):
        self.config = config
        self.agents: Optional[AgentGroup] = None
        self.engine: Optional[Engine] = None

    async def __aenter__(self) -> "OfflineEngine":
        config = self.config
        info = model_info(config.model_config, read_hf_config(config.model_config))
        self.agents = AgentGroup(config, step_capacity(config, info.max_seq_len, len(info.eos_token_ids), info.vocab_size))
        self.engine = Engine(config, load_tokenizer(config.model_config), info, self.agents.connect())
        try:
            await self.engine.start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self.engine is not None:
            await self.engine.stop()
        if self.agents is not None:
            await self.agents.stop()

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[OfflineOutput]:
        """Submit every prompt at once and wait for all of them."""
        await self.engine.prepare(params)
        handles = [self.engine.submit(f"offline-{i}", ids, params, stream=False) for i, ids in enumerate(prompts)]
        return list(await asyncio.gather(*(self._output(h) for h in handles)))

    async def _output(self, handle: RequestHandle) -> OfflineOutput:
        async for event in handle.stream():
            if isinstance(event, FinishEvent) and event.error:
                raise AgentFailure(event.error)
        first = handle.first_token_time
        return OfflineOutput(
            output_ids=handle.outputs[0].output_ids,
            finish_reason=handle.outputs[0].finish_reason,
            first_token_time=None if first is None else first - handle.start_time,
            res_time=handle.end_time - handle.start_time,
        )
