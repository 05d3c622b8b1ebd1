"""The load-test client: prompt construction, arrivals, and both backends against fake streaming servers."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmserve.tools.bench_serving import (LlmserveBackend, OpenAIBackend, Prompt, load_tokenizer, main, parse_len,
                                 random_prompts, run_load, send_offsets)
from llmserve.tools.serving_log import read_records

TOKEN_GAP_S = 0.002


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def llmserve_events(text: str, num_tokens: int):
    for i in range(num_tokens):
        if "CLOSE" in text and i == 2:
            raise RuntimeError("the fake server drops the connection")
        if "ERROR" in text and i == 2:
            yield sse({"error": "agent failed", "error_type": "AgentFailure"})
            return
        await asyncio.sleep(TOKEN_GAP_S)
        yield sse({"token": {"id": 100 + i, "text": " x"}, "generated_text": None, "details": None})
    details = {"finish_reason": "length", "prompt_tokens": 7, "generated_tokens": num_tokens}
    yield sse({"token": None, "generated_text": " x" * num_tokens, "details": details})


async def openai_events(text: str, num_tokens: int, model: str):
    for i in range(num_tokens):
        if "CLOSE" in text and i == 2:
            raise RuntimeError("the fake server drops the connection")
        await asyncio.sleep(TOKEN_GAP_S)
        yield sse({"id": "c", "model": model, "choices": [{"index": 0, "text": " x", "finish_reason": None}]})
    usage = {"prompt_tokens": 9, "completion_tokens": num_tokens, "total_tokens": 9 + num_tokens}
    yield sse({"id": "c", "model": model, "choices": [], "usage": usage})
    yield sse("[DONE]")


def fake_app() -> FastAPI:
    """Both APIs; a prompt containing FAIL500, CLOSE or ERROR makes that request fail that way."""
    app = FastAPI()

    @app.post("/models/{name}/generate")
    async def generate(name: str, request: Request):
        body = await request.json()
        assert body["stream"] is True and body["parameters"]["do_sample"] is False
        if "FAIL500" in body["inputs"]:
            return JSONResponse({"error": "boom", "error_type": "internal"}, status_code=500)
        events = llmserve_events(body["inputs"], body["parameters"]["max_new_tokens"])
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        if "FAIL500" in body["prompt"]:
            return JSONResponse({"error": "boom"}, status_code=500)
        events = openai_events(body["prompt"], body["max_tokens"], body["model"])
        return StreamingResponse(events, media_type="text/event-stream")

    return app


@contextmanager
def serving(app: FastAPI):
    """Serve `app` on a free loopback port in a background thread; yield its base URL; always shut down."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def base_url():
    with serving(fake_app()) as url:
        yield url


def run(backend, prompts, **kwargs):
    return asyncio.run(run_load(backend, prompts, [0.0] * len(prompts), show_progress=False, **kwargs))


# ---------------------------------------------------------------- prompts and arrivals

def test_lengths_parse_as_fixed_or_ranges():
    assert parse_len("128") == (128, 128) and parse_len("64:256") == (64, 256)


def test_random_prompts_have_about_the_requested_token_counts(tokenizer):
    prompts = random_prompts(tokenizer, 8, (100, 100), (16, 32), seed=0)
    for prompt in prompts:
        assert abs(len(tokenizer.encode(prompt.text, add_special_tokens=False).ids) - 100) <= 3
        assert 16 <= prompt.output_len <= 32
    assert all(special not in prompt.text for prompt in prompts for special in ("<s>", "</s>", "<unk>"))


def test_random_prompts_repeat_with_the_seed(tokenizer):
    first = random_prompts(tokenizer, 4, (8, 64), (1, 50), seed=1)
    assert first == random_prompts(tokenizer, 4, (8, 64), (1, 50), seed=1)
    assert first != random_prompts(tokenizer, 4, (8, 64), (1, 50), seed=2)


def test_arrivals_at_a_rate_span_count_over_rate():
    assert send_offsets(3, 2.0, "constant", 0) == [0.0, 0.5, 1.0]
    poisson = send_offsets(2000, 10.0, "poisson", 0)
    assert poisson == sorted(poisson) and poisson[-1] == pytest.approx(200.0, rel=0.1)
    assert send_offsets(3, None, "poisson", 0) == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- client against fake servers

def test_llmserve_stream_records_every_token_and_gap(base_url):
    records, duration_s = run(LlmserveBackend(base_url, "llama", True), [Prompt("hi", 3, 6), Prompt("yo", 3, 1)])
    assert [r.error for r in records] == [None, None]
    assert [r.output_tokens for r in records] == [6, 1] and [len(r.itl) for r in records] == [5, 0]
    assert records[0].prompt_tokens == 7  # from the final event's details
    assert 0 < records[0].first_token_time <= records[0].res_time <= duration_s
    assert all(gap > 0 for gap in records[0].itl)


def test_openai_stream_takes_counts_from_usage(base_url):
    records, _ = run(OpenAIBackend(base_url, "m", True), [Prompt("hi", 3, 5)])
    assert records[0].error is None
    assert (records[0].prompt_tokens, records[0].output_tokens, len(records[0].itl)) == (9, 5, 4)


@pytest.mark.parametrize("backend_class", [LlmserveBackend, OpenAIBackend])
def test_http_errors_and_broken_streams_become_failed_records(base_url, backend_class):
    prompts = [Prompt("FAIL500", 3, 4), Prompt("CLOSE", 3, 6), Prompt("fine", 3, 4)]
    records, _ = run(backend_class(base_url, "llama", True), prompts, concurrency=2)
    assert records[0].error.startswith("HTTP 500")
    assert records[1].error is not None and records[1].output_tokens == 2
    assert records[2].error is None


def test_an_error_event_fails_the_request(base_url):
    records, _ = run(LlmserveBackend(base_url, "llama", True), [Prompt("ERROR", 3, 6)])
    assert "AgentFailure: agent failed" == records[0].error


def test_a_refused_connection_is_a_failure_not_a_crash():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["-P", str(port), "-N", "2", "--input-len", "4", "--output-len", "2", "--no-progress"]) == 1


def test_command_writes_records_and_summary(base_url, tmp_path, capsys):
    outdir = tmp_path / "run1"
    code = main(["--url", base_url, "-X", "200", "-T", "0.03", "--arrival", "constant", "--concurrency", "2",
                 "--input-len", "8:16", "--output-len", "3", "--ignore-eos", "--no-progress",
                 "--slo-ttft", "1", "-O", str(outdir)])
    assert code == 0
    records = read_records(str(outdir / "requests.jsonl"))
    assert len(records) == 6 and all(r.output_tokens == 3 and len(r.itl) == 2 for r in records)
    summary = json.loads((outdir / "summary.json").read_text())
    assert summary["num_completed"] == 6 and summary["args"]["concurrency"] == 2
    assert "goodput" in capsys.readouterr().out


def test_the_bench_serve_verb_runs_the_load_test(base_url, tmp_path, capsys):
    from llmserve.cli import main as llmserve

    outdir = tmp_path / "run"
    assert llmserve(["bench", "serve", "--url", base_url, "-N", "3", "--input-len", "8", "--output-len", "2",
                     "--ignore-eos", "--no-progress", "-O", str(outdir)]) == 0
    assert [r.output_tokens for r in read_records(str(outdir / "requests.jsonl"))] == [2, 2, 2]
    assert "completed requests" in capsys.readouterr().out
