"""Facts about the processes of this server on this host (psutil): memory, CPU time, whom to pin where."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import psutil


@dataclass(frozen=True)
class ProcessStats:
    """One process: `master` or `agent<rank>`."""

    process: str
    pid: int
    rss_bytes: int
    cpu_seconds: float  # user + system, since the process started


class ProcessWatch:
    """Reads the resident memory and CPU time of the master and the agents that run on this host."""

    def __init__(self) -> None:
        self.processes: dict[str, psutil.Process] = {"master": psutil.Process(os.getpid())}

    def set_agents(self, pids: dict[int, int]) -> None:
        """The agents' pids by rank (only agents on this host: a pid elsewhere names another process here)."""
        self.processes = {"master": self.processes["master"]}
        for rank, pid in sorted(pids.items()):
            try:
                self.processes[f"agent{rank}"] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass

    def stats(self) -> list[ProcessStats]:
        found = []
        for name, process in self.processes.items():
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    found.append(ProcessStats(name, process.pid, process.memory_info().rss, times.user + times.system))
            except psutil.NoSuchProcess:  # an agent that just died: the engine reports the death itself
                pass
        return found


def cpu_plan(cores: list[int], num_agents: int) -> Optional[tuple[list[int], list[list[int]]]]:
    """(the master's cores, each agent's cores) when there are enough to keep the master off the agents' cores
    and still give every agent two; None when there are not (everyone shares every core)."""
    if len(cores) - 1 < 2 * num_agents:
        return None
    per_agent = (len(cores) - 1) // num_agents
    agents = [cores[1 + rank * per_agent : 1 + (rank + 1) * per_agent] for rank in range(num_agents)]
    return cores[:1], agents


def end_process_tree(process: psutil.Process, timeout: float) -> None:
    """Terminate a process and every process it started (kill what lingers after `timeout` seconds)."""
    try:
        victims = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=timeout)
    for victim in alive:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def end_process_group(group: int, timeout: float) -> None:
    """End what is left of a process group (an agent is the leader of its own): processes its agent started
    and left behind when it exited, which are no longer anyone's children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)
