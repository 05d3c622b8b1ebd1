"""Load test of a streaming server: llmserve's `/models/{name}/generate`, or OpenAI `/v1/completions` / `/v1/chat/completions`.

Sends requests at a given rate (Poisson or constant arrivals) or all at once,
records each one's first-token time, inter-token gaps and end-to-end time,
writes them as JSONL and prints the summary:

    llmserve bench serve -P 8835 -X 5 -T 60 --input-len 128 --output-len 64:256 --ignore-eos -O results/run1
    llmserve bench serve --url http://127.0.0.1:8000 --backend openai --model my-model -N 200 --concurrency 32
    llmserve bench serve --backend openai-chat --api-key "$LLMSERVE_API_KEY" -N 100 --concurrency 16

(`python tools/bench_serving.py ...` in the repository takes the same arguments.)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import httpx
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.tools.serving_log import RequestRecord, format_summary, summarize, write_records  # noqa: E402

BUILTIN_SPECIAL_IDS = 3  # the builtin tokenizer's <unk>, <s>, </s>


@dataclass
class Prompt:
    """One request to send: its text, its length in tokens, and how many tokens to ask for."""

    text: str
    prompt_len: int
    output_len: int


# ---------------------------------------------------------------- prompts

def parse_len(text: str) -> tuple[int, int]:
    """`N` or `MIN:MAX` -> (min, max)."""
    low, _, high = text.partition(":")
    bounds = (int(low), int(high or low))
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"length {text!r}: want N or MIN:MAX with 1 <= MIN <= MAX")
    return bounds


def load_tokenizer(name: str) -> Tokenizer:
    """`builtin` (the embedded model's tokenizer), a tokenizer.json, or a directory holding one."""
    if name == "builtin":
        from llmserve.master.tokenizer import build_builtin_tokenizer
        return build_builtin_tokenizer()
    return Tokenizer.from_file(os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name)


def usable_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids a random prompt may use: all but the special ones."""
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return [i for i in range(tokenizer.get_vocab_size()) if i not in special]


def random_text(tokenizer: Tokenizer, ids: list[int], length: int, rng: random.Random) -> tuple[str, int]:
    """Text of about `length` tokens decoded from random ids, and its actual token count."""
    token_ids = rng.choices(ids, k=length)
    # decoding then re-encoding merges or splits tokens; re-cut a few times to get close to `length`
    for _ in range(4):
        text = tokenizer.decode(token_ids)
        token_ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(token_ids) == length:
            break
        token_ids = token_ids[:length] + rng.choices(ids, k=max(length - len(token_ids), 0))
    return text, len(tokenizer.encode(text, add_special_tokens=False).ids)


def random_prompts(tokenizer: Tokenizer, num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                   seed: int) -> list[Prompt]:
    """`num` prompts of random tokens, lengths drawn uniformly from the ranges; same seed, same prompts."""
    rng = random.Random(seed)
    ids = usable_ids(tokenizer)
    prompts = []
    for _ in range(num):
        text, prompt_len = random_text(tokenizer, ids, rng.randint(*input_len), rng)
        prompts.append(Prompt(text, prompt_len, rng.randint(*output_len)))
    return prompts


def dataset_prompts(path: str, tokenizer: Tokenizer, num: int, output_len: tuple[int, int]) -> list[Prompt]:
    """`num` prompts from JSONL lines `{"prompt": ..., "output_len": ...}`, cycled if the file is shorter."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no prompts")
    rows = [rows[i % len(rows)] for i in range(num)]
    return [Prompt(row["prompt"], len(tokenizer.encode(row["prompt"], add_special_tokens=False).ids),
                   int(row.get("output_len", output_len[0]))) for row in rows]


# ---------------------------------------------------------------- arrivals

def send_offsets(num: int, rate: Optional[float], arrival: str, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent; all at 0 without a rate."""
    if not rate:
        return [0.0] * num
    if arrival == "constant":
        return [i / rate for i in range(num)]
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    return [0.0] + [float(t) for t in np.cumsum(gaps)[:-1]]


# ---------------------------------------------------------------- backends

class StreamError(Exception):
    """The server reported an error inside the stream."""


class TokenTracker:
    """Arrival times of a request's tokens, counted from the moment it was sent."""

    def __init__(self):
        self.start = time.perf_counter()
        self.arrivals: list[float] = []
        self.num_prompt_tokens: Optional[int] = None
        self.num_output_tokens: Optional[int] = None
        self.is_finished = False

    def token(self) -> None:
        self.arrivals.append(time.perf_counter() - self.start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def auth_headers(api_key: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class LlmserveBackend:
    """llmserve's `/models/{name}/generate` with `"stream": true`."""

    def __init__(self, base_url: str, model: str, ignore_eos: bool, api_key: Optional[str] = None):
        self.url = f"{base_url}/models/{model}/generate"
        self.ignore_eos = ignore_eos
        self.headers = auth_headers(api_key)

    def body(self, prompt: Prompt) -> dict:
        parameters = {"max_new_tokens": prompt.output_len, "ignore_eos": self.ignore_eos, "do_sample": False}
        return {"inputs": prompt.text, "parameters": parameters, "stream": True}

    def on_event(self, data: str, tracker: TokenTracker) -> None:
        event = json.loads(data)
        if event.get("error"):
            raise StreamError(f"{event.get('error_type', 'error')}: {event['error']}")
        if event.get("token") is not None:
            tracker.token()
        details = event.get("details")
        if details is not None:
            tracker.num_prompt_tokens = details.get("prompt_tokens")
            tracker.is_finished = True


class OpenAIBackend:
    """Any OpenAI-compatible `/v1/completions` server, streaming (`ignore_eos` is vLLM's and our extra field)."""

    path = "/v1/completions"

    def __init__(self, base_url: str, model: str, ignore_eos: bool, api_key: Optional[str] = None):
        self.url = base_url + self.path
        self.model = model
        self.ignore_eos = ignore_eos
        self.headers = auth_headers(api_key)

    def body(self, prompt: Prompt) -> dict:
        return {"model": self.model, "prompt": prompt.text, "max_tokens": prompt.output_len, "stream": True,
                "ignore_eos": self.ignore_eos, "stream_options": {"include_usage": True}, "temperature": 0}

    @staticmethod
    def text_of(choice: dict) -> str:
        return choice.get("text") or ""

    def on_event(self, data: str, tracker: TokenTracker) -> None:
        if data == "[DONE]":
            tracker.is_finished = True
            return
        chunk = json.loads(data)
        if chunk.get("error"):
            raise StreamError(str(chunk["error"]))
        if any(self.text_of(choice) for choice in chunk.get("choices") or []):
            tracker.token()
        usage = chunk.get("usage")
        if usage:
            tracker.num_prompt_tokens = usage.get("prompt_tokens")
            tracker.num_output_tokens = usage.get("completion_tokens")


class OpenAIChatBackend(OpenAIBackend):
    """Any OpenAI-compatible `/v1/chat/completions` server: the prompt is one user message."""

    path = "/v1/chat/completions"

    def body(self, prompt: Prompt) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt.text}],
                "max_completion_tokens": prompt.output_len, "stream": True, "ignore_eos": self.ignore_eos,
                "stream_options": {"include_usage": True}, "temperature": 0}

    @staticmethod
    def text_of(choice: dict) -> str:
        return (choice.get("delta") or {}).get("content") or ""


BACKENDS = {"llmserve": LlmserveBackend, "openai": OpenAIBackend, "openai-chat": OpenAIChatBackend}


# ---------------------------------------------------------------- client

async def stream_events(client: httpx.AsyncClient, backend, prompt: Prompt, request_id: str,
                        tracker: TokenTracker) -> None:
    """Send one request and feed each `data:` event of its answer to the backend."""
    headers = {"X-Request-Id": request_id, **backend.headers}
    async with client.stream("POST", backend.url, json=backend.body(prompt), headers=headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise StreamError(f"HTTP {response.status_code}: {text[:200]}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                backend.on_event(line[len("data:"):].strip(), tracker)
    if not tracker.is_finished:
        raise StreamError("stream ended before its final event")


def to_record(request_id: str, send_time: float, prompt: Prompt, tracker: TokenTracker,
              error: Optional[str]) -> RequestRecord:
    """What the tracker saw, as a record."""
    arrivals = tracker.arrivals
    return RequestRecord(
        request_id=request_id, send_time=send_time,
        prompt_tokens=tracker.num_prompt_tokens if tracker.num_prompt_tokens is not None else prompt.prompt_len,
        output_tokens=tracker.num_output_tokens if tracker.num_output_tokens is not None else len(arrivals),
        first_token_time=arrivals[0] if arrivals else None,
        res_time=tracker.elapsed(),
        itl=[float(b - a) for a, b in zip(arrivals, arrivals[1:])],
        error=error)


async def send_request(client: httpx.AsyncClient, backend, prompt: Prompt, request_id: str) -> RequestRecord:
    """One request, timed; a refused, timed-out, HTTP-error or broken stream becomes a record with `error`."""
    send_time = time.time()
    tracker = TokenTracker()
    error = None
    try:
        await stream_events(client, backend, prompt, request_id, tracker)
    except StreamError as e:
        error = str(e)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return to_record(request_id, send_time, prompt, tracker, error)


async def run_load(backend, prompts: list[Prompt], offsets: list[float], concurrency: Optional[int] = None,
                   timeout_s: float = 300.0, show_progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Send every prompt at its offset, at most `concurrency` in flight; the records and the run's duration."""
    gate = asyncio.Semaphore(concurrency or len(prompts) or 1)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    progress = tqdm(total=len(prompts), unit="req", disable=not show_progress)
    start = time.perf_counter()

    async def one(index: int, client: httpx.AsyncClient) -> RequestRecord:
        await asyncio.sleep(max(start + offsets[index] - time.perf_counter(), 0.0))
        async with gate:
            record = await send_request(client, backend, prompts[index], f"bench-{index}")
        progress.update(1)
        return record

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False) as client:
        records = await asyncio.gather(*(one(i, client) for i in range(len(prompts))))
    progress.close()
    return list(records), time.perf_counter() - start


# ---------------------------------------------------------------- command line

def parse_args(argv: Optional[list[str]], prog: Optional[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="llmserve")
    parser.add_argument("--url", help="server base URL (default http://127.0.0.1:PORT)")
    parser.add_argument("-P", "--port", type=int, default=8835)
    parser.add_argument("--model", default="llama", help="model name in the URL (llmserve) or the body (openai)")
    parser.add_argument("--api-key", default=os.environ.get("LLMSERVE_API_KEY"),
                        help="sent as `Authorization: Bearer KEY` (default: $LLMSERVE_API_KEY)")
    parser.add_argument("-X", "--rate", type=float, help="requests per second (default: all at once)")
    parser.add_argument("-T", "--time", type=float, help="seconds to send for; sends RATE*T requests")
    parser.add_argument("-N", "--num-requests", type=int, help="number of requests")
    parser.add_argument("--arrival", choices=["poisson", "constant"], default="poisson")
    parser.add_argument("--concurrency", type=int, help="most requests in flight")
    parser.add_argument("--input-len", type=parse_len, default=(128, 128), help="N or MIN:MAX prompt tokens")
    parser.add_argument("--output-len", type=parse_len, default=(128, 128), help="N or MIN:MAX output tokens")
    parser.add_argument("--dataset", help="JSONL of {\"prompt\": ..., \"output_len\": ...} instead of random prompts")
    parser.add_argument("--tokenizer", default="builtin", help="'builtin', a tokenizer.json, or its directory")
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds, for goodput")
    parser.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds, for goodput")
    parser.add_argument("-O", "--outdir", help="write requests.jsonl and summary.json here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.num_requests = request_count(parser, args)
    return args


def request_count(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """-N COUNT, or RATE*T."""
    if args.num_requests is not None and args.time is not None:
        parser.error("give -N COUNT or -T SECONDS, not both")
    if args.num_requests is not None:
        return args.num_requests
    if args.rate is None or args.time is None:
        parser.error("give -N COUNT, or -X RATE with -T SECONDS")
    return round(args.rate * args.time)


def build_prompts(args: argparse.Namespace) -> list[Prompt]:
    tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset:
        return dataset_prompts(args.dataset, tokenizer, args.num_requests, args.output_len)
    return random_prompts(tokenizer, args.num_requests, args.input_len, args.output_len, args.seed)


def save(outdir: str, records: list[RequestRecord], summary: dict, args: argparse.Namespace) -> None:
    os.makedirs(outdir, exist_ok=True)
    write_records(os.path.join(outdir, "requests.jsonl"), records)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        arguments = {k: v for k, v in vars(args).items() if k != "api_key"}  # never write the key to disk
        json.dump({"args": arguments, **summary}, f, indent=2)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """`llmserve bench serve`: run the load, print the summary; 1 when every request failed."""
    args = parse_args(argv, prog)
    backend = BACKENDS[args.backend](args.url or f"http://127.0.0.1:{args.port}", args.model, args.ignore_eos, args.api_key)
    prompts = build_prompts(args)
    offsets = send_offsets(len(prompts), args.rate, args.arrival, args.seed)
    records, duration_s = asyncio.run(run_load(backend, prompts, offsets, args.concurrency, args.timeout,
                                               show_progress=not args.no_progress))
    summary = summarize(records, duration_s, args.slo_ttft, args.slo_tpot)
    if args.outdir:
        save(args.outdir, records, summary, args)
    print(format_summary(summary))
    return 0 if summary["num_completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
