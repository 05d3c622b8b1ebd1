"""The agents a master serves with: launched here or started by hand, reached through one transport, restarted when they die."""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections import deque
from typing import Optional

import psutil

from llmserve.common.agent_keys import ChannelKeys, keys_pipe, load_keys, new_keys
from llmserve.common.config import Config, ServingConfig
from llmserve.common.errors import ConfigError
from llmserve.common.step_arrays import StepCapacity
from llmserve.master.agent_client import AgentEndpoint, Transport, ZmqShmTransport
from llmserve.master.processes import cpu_plan, end_process_group, end_process_tree

logger = logging.getLogger("llmserve.master")

AGENT_STOP_TIMEOUT = 10.0  # a clean shutdown: agents finish their step and unmap the arrays
AGENT_END_TIMEOUT = 5.0  # a restart: what is left of the group may be stuck in an all-reduce with the dead rank


class AgentGroup:
    """Launches the agents (when this master does) with their keys, and connects a transport to them."""

    def __init__(self, config: Config, capacity: StepCapacity):
        self.config = config
        self.capacity = capacity
        self.master_keys, self.agent_keys = channel_keys(config.serving_config)
        self.processes: list[subprocess.Popen] = []
        self.agent_cpus = self._pin_master() if config.serving_config.launch_agents else None

    def _pin_master(self) -> Optional[list[list[int]]]:
        """With cpu_affinity auto and cores enough, keep this master on a core of its own; the agents' cores."""
        if self.config.serving_config.cpu_affinity != "auto":
            return None
        master = psutil.Process()
        plan = cpu_plan(master.cpu_affinity(), self.config.serving_config.world_size)
        if plan is None:
            return None
        master_cores, agent_cores = plan
        master.cpu_affinity(master_cores)  # threads started from now on (ZeroMQ's, the text worker) inherit it
        logger.info("CPU affinity: master on cores %s, agents on %s", master_cores, agent_cores)
        return agent_cores

    def connect(self) -> ZmqShmTransport:
        """Start the agents we launch, and a transport to every agent; its `start` waits until they are ready."""
        serving = self.config.serving_config
        if serving.launch_agents:
            self.processes = launch_agents(self.config, self.agent_keys, self.agent_cpus)
        return ZmqShmTransport(
            endpoints(self.config, self.processes), self.capacity, serving.step_timeout, self.master_keys,
            inline=serving.transport == "inline",
        )

    async def restart(self, old: Transport) -> Transport:
        """End what is left of the agents and of `old` (its shared memory included), then `connect` afresh.

        Agents started by hand are not ours to start: the new transport waits for them to come back.
        """
        await old.close()
        await asyncio.to_thread(end_agents, self.processes)
        return self.connect()

    async def stop(self) -> None:
        """Wait for agents told to shut down (by the transport's close); end the ones that linger."""
        await asyncio.to_thread(stop_agents, self.processes)


def channel_keys(serving: ServingConfig) -> tuple[ChannelKeys, Optional[ChannelKeys]]:
    """(the master's keys, the keys handed to launched agents): from agent_keys_dir, else fresh for this start."""
    if serving.agent_keys_dir is None and not serving.launch_agents:
        raise ConfigError(
            "serving_config.agent_keys_dir: agents started by hand need the channel's keys; make them with "
            "`llmserve keys DIR` and set agent_keys_dir: DIR (see README, Security)"
        )
    if serving.agent_keys_dir is None:
        return new_keys()
    agent_keys = load_keys(serving.agent_keys_dir, "agent") if serving.launch_agents else None
    return load_keys(serving.agent_keys_dir, "master"), agent_keys


def endpoints(config: Config, processes: list[subprocess.Popen]) -> list[AgentEndpoint]:
    serving = config.serving_config
    return [
        AgentEndpoint(rank, f"tcp://{serving.agent_host(rank)}:{port}", processes[rank] if processes else None)
        for rank, port in enumerate(serving.agent_ports)
    ]


def launch_agents(config: Config, keys: ChannelKeys, cpus: Optional[list[list[int]]] = None) -> list[subprocess.Popen]:
    """Start one agent process per rank through the same `llmserve agent` entry point; each reads its keys from a
    pipe, and keeps to its `cpus[rank]` when given."""
    processes = []
    for rank in range(len(config.serving_config.agent_ports)):
        keys_fd = keys_pipe(keys)
        command = [
            sys.executable, "-m", "llmserve", "agent", "--config", config.path, "--rank", str(rank),
            "--parent-pid", str(os.getpid()), "--keys-fd", str(keys_fd),
        ]
        if cpus is not None:
            command += ["--cpus", ",".join(map(str, cpus[rank]))]
        try:
            # A session of its own: Ctrl-C in the terminal reaches the master, which stops the agents in order.
            processes.append(subprocess.Popen(command, start_new_session=True, pass_fds=(keys_fd,)))
        finally:
            os.close(keys_fd)
    return processes


def stop_agents(processes: list[subprocess.Popen]) -> None:
    """Wait for agents told to shut down; end the ones that linger, then whatever any of them left running."""
    for process in processes:
        try:
            process.wait(AGENT_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            end_process_tree(psutil.Process(process.pid), AGENT_END_TIMEOUT)
            process.wait()
        end_process_group(process.pid, AGENT_END_TIMEOUT)


def end_agents(processes: list[subprocess.Popen]) -> None:
    """End agents and every process they started, now (a restart replaces them)."""
    for process in processes:
        try:
            end_process_tree(psutil.Process(process.pid), AGENT_END_TIMEOUT)
        except psutil.NoSuchProcess:
            pass
        process.wait()
        end_process_group(process.pid, AGENT_END_TIMEOUT)


class RestartPolicy:
    """At most `limit` restarts within any `window` seconds, each after a delay that doubles with the restarts before it."""

    MAX_DELAY = 60.0

    def __init__(self, limit: int, window: float, backoff: float):
        self.limit = limit
        self.window = window
        self.backoff = backoff
        self.restarts: deque[float] = deque()  # when each restart in the window began

    def next_delay(self, now: float) -> Optional[float]:
        """Seconds to wait before the next restart, which this counts; None when the budget is spent."""
        while self.restarts and now - self.restarts[0] > self.window:
            self.restarts.popleft()
        if len(self.restarts) >= self.limit:
            return None
        delay = min(self.backoff * 2 ** len(self.restarts), self.MAX_DELAY)
        self.restarts.append(now + delay)
        return delay

    def describe(self) -> str:
        return f"{self.limit} restarts within {self.window:g} s (serving_config.agent_restart_limit / agent_restart_window)"
