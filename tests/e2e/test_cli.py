"""`llmserve serve MODEL_DIR` with flags, as a user starts it: the master and its agents serve what the flags say,
and `llmserve complete` streams from it."""
from __future__ import annotations

import sys

import httpx

from llmserve.cli import main
from tests.e2e.server import free_ports, running_command, save_tiny_llama


def test_serve_a_checkpoint_directory_with_flags(tmp_path, capsys):
    save_tiny_llama(tmp_path / "model")
    port, agent_port = free_ports(2)
    command = [sys.executable, "-m", "llmserve", "serve", str(tmp_path / "model"), "--port", str(port),
               "--agent-port", str(agent_port), "--served-model-name", "tiny", "--max-model-len", "128",
               "--num-blocks", "40", "--block-size", "8", "--max-num-seqs", "4"]
    with running_command(command, port, str(tmp_path / "serve.log"), cwd=str(tmp_path)) as server:
        (model,) = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        health = server.health().json()
        expected = httpx.post(f"{server.url}/v1/completions", timeout=60,
                              json={"prompt": "Hello", "max_tokens": 5, "temperature": 0}).json()["choices"][0]["text"]
        capsys.readouterr()
        code = main(["complete", "--url", server.url, "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0"])
        out = capsys.readouterr().out
    assert (model["id"], model["max_model_len"]) == ("tiny", 128)
    assert health["kv_blocks_total"] == 40  # the agent sized its KV cache from the flags too
    assert code == 0 and out == expected + "\n"
