"""Process facts: who runs on which cores, and ending an agent with everything it started."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from llmserve.master.processes import ProcessWatch, cpu_plan, end_process_tree


def test_the_master_gets_a_core_of_its_own_only_when_every_agent_keeps_two():
    assert cpu_plan([0, 1], 1) is None
    assert cpu_plan([0, 1, 2], 1) == ([0], [[1, 2]])
    assert cpu_plan(list(range(8)), 2) == ([0], [[1, 2, 3], [4, 5, 6]])
    assert cpu_plan(list(range(4)), 2) is None


def test_ending_a_process_tree_ends_the_grandchildren_too():
    spawn = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    process = psutil.Process(parent.pid)
    deadline = time.monotonic() + 10
    while not process.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = process.children()
    end_process_tree(process, timeout=5)
    parent.wait(5)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_the_watch_reports_this_process_and_skips_agents_that_are_gone():
    watch = ProcessWatch()
    watch.set_agents({0: 2**22 + 12345})  # no such process
    (master,) = watch.stats()
    assert master.process == "master" and master.rss_bytes > 0 and master.cpu_seconds > 0
