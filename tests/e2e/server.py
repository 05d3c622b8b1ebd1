"""Start a real `llmserve serve` on free loopback ports and always stop it."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import httpx
import yaml

from llmserve.tools.local_config import free_port, free_ports  # noqa: F401 (tests import free_port from here)
from tests.conftest import ROOT

START_TIMEOUT = 120.0

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


TINY_LLAMA_CHECKPOINT = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def save_tiny_llama(path, bias_std: float = 0.0, **config):
    """A random tiny Llama checkpoint (seed 0) beside the builtin tokenizer's tokenizer.json; `config` overrides
    LlamaConfig fields. transformers starts biases at zero; `bias_std` > 0 draws them, so a bias added twice shows."""
    import torch
    import transformers

    from llmserve.master.tokenizer import build_builtin_tokenizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA_CHECKPOINT, **config})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if bias_std > 0 and name.endswith(".bias"):
                param.normal_(0.0, bias_std)
    model.save_pretrained(path, safe_serialization=True)
    build_builtin_tokenizer().save(str(path / "tokenizer.json"))
    return model


class Server:
    """A running server: its process, base URL and log file."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: str, config_path: str):
        self.process = process
        self.url = url
        self.log_path = log_path
        self.config_path = config_path

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def agent_pids(self) -> list[int]:
        """Pids of the processes whose parent is the master."""
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.process.pid and "agent" in _cmdline(int(entry)):
                    children.append(int(entry))
        return children


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def write_config(tmp_path, model_config: dict | None = None, **sections) -> str:
    server_port, agent_port = free_ports(2)
    config = {
        "model_config": model_config or {"load_format": "dummy", "dummy_config": TINY_LLAMA, "tokenizer_path": "builtin"},
        "serving_config": {"server_port": server_port, "agent_ports": [agent_port], "num_threads": 1},
        "pa_config": {"num_blocks": 256, "block_size": 8},
        "scheduler_config": {},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / f"server-{config['serving_config']['server_port']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@contextlib.contextmanager
def running_server(config_path: str, wait_ready: bool = True) -> Iterator[Server]:
    """Start the server; yield once /health is 200; SIGTERM it (then SIGKILL) no matter what."""
    with open(config_path) as f:
        port = yaml.safe_load(f)["serving_config"]["server_port"]
    command = [sys.executable, "-m", "llmserve", "serve", "--config", config_path]
    with running_command(command, port, config_path + ".log", config_path, wait_ready=wait_ready) as server:
        yield server


@contextlib.contextmanager
def running_command(command: list[str], port: int, log_path: str, config_path: str = "", cwd: str = ROOT,
                    env: dict | None = None, wait_ready: bool = True) -> Iterator[Server]:
    """Start a server with `command` (HTTP on 127.0.0.1:`port`), logging to `log_path`; yield once /health is
    200; SIGTERM it (then SIGKILL) no matter what."""
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path, config_path)
    try:
        if wait_ready:
            _wait_healthy(server)
        yield server
    finally:
        stop(server)
        log.close()


def stop(server: Server, timeout: float = 30.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    for pid in server.agent_pids():
        os.kill(pid, signal.SIGKILL)
    return server.process.returncode


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if server.health().status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {START_TIMEOUT}s:\n{server.log()}")


def stream_tokens(url: str, prompt: str, **parameters) -> tuple[list[int], dict]:
    """Token ids and the final event of one streaming generate call."""
    body = {"inputs": prompt, "parameters": parameters, "stream": True}
    ids, final = [], None
    with httpx.stream("POST", f"{url}/models/llama/generate", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["token"] is not None:
                ids.append(event["token"]["id"])
            else:
                final = event
    return ids, final
