"""The `llmserve` command: every verb's help, serve's flags as config keys, and the chat and complete
clients against a live in-process server."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from llmserve.cli import build_parser, main, readable_by_agents, serve_config, serve_overrides
from llmserve.common.config import load_config
from tests.unit.fake_agent import fake_engine
from tests.unit.test_api import serving_on_loopback
from tests.unit.test_openai_api import fake_config_with_key

VERBS = ["serve", "agent", "keys", "chat", "complete", "bench", "bench serve", "bench offline", "profile",
         "check-precision", "plot"]
KEY = "s3cret"


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_answers_help(verb, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*verb.split(), "--help"])
    assert exited.value.code == 0
    assert f"usage: llmserve {verb}" in capsys.readouterr().out


def test_the_command_lists_every_verb(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"    {verb.split()[0]}" in out for verb in VERBS)


def test_an_unknown_flag_is_refused_not_ignored(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--max-model-length", "64"])
    assert exited.value.code == 2 and "unrecognized arguments: --max-model-length" in capsys.readouterr().err


# ---------------------------------------------------------------- serve's config

def config_of(*argv: str):
    return serve_config(build_parser().parse_args(["serve", *argv]))


def test_serve_model_dir_with_flags_sets_those_keys_over_the_defaults(tmp_path):
    config = config_of(str(tmp_path), "--host", "0.0.0.0", "--port", "9000", "--agent-port", "9100",
                       "--tensor-parallel-size", "2", "--served-model-name", "tiny", "--dtype", "bfloat16",
                       "--max-model-len", "512", "--tokenizer", str(tmp_path), "--seed", "7", "--block-size", "32",
                       "--num-blocks", "64", "--max-num-seqs", "8", "--api-key", KEY)
    model, serving = config.model_config, config.serving_config
    assert (model.model_path, model.load_format, model.dummy_config) == (str(tmp_path), "auto", None)
    assert (model.model_name, model.model_dtype, model.max_seq_len, model.tokenizer_path, model.seed) == (
        "tiny", "bfloat16", 512, str(tmp_path), 7)
    assert (serving.server_ip, serving.server_port, serving.agent_ports) == ("0.0.0.0", 9000, [9100, 9101])
    assert serving.api_key == KEY
    assert (config.pa_config.block_size, config.pa_config.num_blocks) == (32, 64)
    assert config.scheduler_config.decode_batch_size == 8
    assert config.scheduler_config.prefill_batch_size == 16  # a default: no file's model settings leak in
    assert config.scheduler_config.overlap_scheduling  # on unless switched off
    assert not config_of(str(tmp_path), "--no-overlap-scheduling").scheduler_config.overlap_scheduling


def test_serve_model_dir_alone_keeps_no_dummy_model(tmp_path):
    model = config_of(str(tmp_path)).model_config
    assert (model.load_format, model.dummy_config, model.tokenizer_path) == ("auto", None, None)


def test_serve_without_arguments_serves_the_embedded_default_model():
    config = config_of("--port", "9000", "--agent-port", "9001")
    assert config.model_config.load_format == "dummy" and config.model_config.dummy_config["hidden_size"] == 256
    assert (config.serving_config.server_port, config.serving_config.agent_ports) == (9000, [9001])


def test_serve_model_dir_replaces_the_model_of_a_config_file(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": 8}},
                                    "scheduler_config": {"prefill_batch_size": 4}}))
    config = config_of(str(tmp_path), "--config", str(path))
    assert (config.model_config.model_path, config.model_config.dummy_config) == (str(tmp_path), None)
    assert config.scheduler_config.prefill_batch_size == 4


@pytest.mark.parametrize("flag, value, key, expected", [
    ("--kv-cache-memory", "4GiB", "kv_cache_memory", "4GiB"),
    ("--memory-utilization", "0.3", "memory_utilization", 0.3),
    ("--num-blocks", "auto", "num_blocks", "auto"),
])
def test_a_kv_cache_size_flag_replaces_the_files_size(tmp_path, flag, value, key, expected):
    args = build_parser().parse_args(["serve", flag, value])
    assert serve_overrides(args)["pa_config"][key] == expected
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"model_config": {"load_format": "dummy", "dummy_config": {"vocab_size": 8}},
                                    "pa_config": {"num_blocks": 100}}))
    pa_config = config_of("--config", str(path), flag, value).pa_config
    assert getattr(pa_config, key) == expected
    assert pa_config.num_blocks == "auto"


def test_a_wrong_flag_value_is_reported_with_its_key(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "9000"]) == 2
    assert "model_config.model_path" in capsys.readouterr().err


def test_the_agents_read_the_served_config_but_never_the_api_key(tmp_path):
    config = config_of(str(tmp_path), "--port", "9000", "--agent-port", "9100", "--num-blocks", "64", "--api-key", KEY)
    with readable_by_agents(config, is_the_file=False) as launched:
        folder = os.path.dirname(launched.path)
        assert os.stat(folder).st_mode & 0o077 == 0
        assert KEY not in Path(launched.path).read_text()
        read = load_config(launched.path)
        assert read.serving_config.api_key is None
        assert read.to_dict() == {**config.to_dict(), "serving_config": {**config.to_dict()["serving_config"],
                                                                         "api_key": None}}
    assert not os.path.exists(folder)


# ---------------------------------------------------------------- chat and complete

def run_client(argv: list[str], stdin: str, monkeypatch, reference=None, key: str | None = KEY):
    """Serve a fake engine (with `key`) on loopback, run `llmserve ARGV --url URL` on `stdin`; its exit status
    and what `reference(client)` answers (a non-streamed client of the same server, with the key)."""
    engine = fake_engine(fake_config_with_key(key)) if key else fake_engine()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))

    async def go():
        await engine.start()
        try:
            async with serving_on_loopback(engine) as port:
                url = f"http://127.0.0.1:{port}"
                code = await asyncio.to_thread(main, [*argv, "--url", url])
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as client:
                    return code, reference and await reference(client)
        finally:
            await engine.stop()

    return asyncio.run(go())


async def chat_answers(client: httpx.AsyncClient, turns: list[str], **params) -> list[str]:
    """The non-streamed replies to `turns`, each sent with the conversation before it."""
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        body = (await client.post("/v1/chat/completions", json={"messages": messages, **params})).json()
        replies.append(body["choices"][0]["message"]["content"])
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


async def completions(client: httpx.AsyncClient, prompts: list[str], **params) -> list[str]:
    answers = [await client.post("/v1/completions", json={"prompt": p, **params}) for p in prompts]
    return [answer.json()["choices"][0]["text"] for answer in answers]


def test_chat_streams_each_reply_and_keeps_the_conversation(monkeypatch, capsys):
    turns = ["Hello there", "And again"]
    code, replies = run_client(["chat", "--api-key", KEY, "--max-tokens", "5", "--temperature", "0"],
                               "\n".join(turns) + "\n/exit\nnever sent\n", monkeypatch,
                               lambda client: chat_answers(client, turns, max_tokens=5, temperature=0))
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert all(replies) and out == "".join(reply + "\n" for reply in replies)


def test_chat_sends_the_key_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("LLMSERVE_API_KEY", KEY)
    code, _ = run_client(["chat", "--max-tokens", "3"], "Hi\n", monkeypatch)
    assert code == 0 and capsys.readouterr().err == ""


def test_chat_without_the_key_prints_the_servers_refusal(monkeypatch, capsys):
    monkeypatch.delenv("LLMSERVE_API_KEY", raising=False)
    code, _ = run_client(["chat", "--max-tokens", "3"], "Hi\n", monkeypatch)
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == "error: HTTP 401: missing or wrong API key: send Authorization: Bearer <key>\n"


def test_complete_streams_the_completion_of_each_line(monkeypatch, capsys):
    prompts = ["I love Beijing, because", "Once upon a time"]
    code, answers = run_client(["complete", "--api-key", KEY, "--max-tokens", "6", "--temperature", "0"],
                               "\n".join(prompts) + "\n", monkeypatch,
                               lambda client: completions(client, prompts, max_tokens=6, temperature=0))
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert all(answers) and out == "".join(answer + "\n" for answer in answers)


def test_complete_one_prompt_and_a_bad_request(monkeypatch, capsys):
    code, answers = run_client(["complete", "--prompt", "Hello", "--max-tokens", "4"], "", monkeypatch,
                               lambda client: completions(client, ["Hello"], max_tokens=4), key=None)
    assert code == 0 and capsys.readouterr().out == answers[0] + "\n"
    code, _ = run_client(["complete", "--prompt", "Hello", "--max-tokens", "0"], "", monkeypatch, key=None)
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.startswith("error: HTTP 400: max_tokens")


def test_a_server_that_is_not_there_is_an_error_not_a_traceback(capsys):
    with socket.socket() as sock:  # a port nobody listens on: bound, then freed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["complete", "--url", f"http://127.0.0.1:{port}", "--prompt", "x"]) == 1
    assert "ConnectError" in capsys.readouterr().err


# ---------------------------------------------------------------- tools

def test_a_tool_verb_without_the_tools_extra_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "llmserve.tools.plot_logs", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["plot", "requests.jsonl"]) == 1
    assert "pip install 'llmserve[tools]'" in capsys.readouterr().err
