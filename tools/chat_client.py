"""Interactive streaming clients of a running server, behind `llmserve chat` and `llmserve complete`.

Every line read is one turn: `chat` sends the whole conversation so far to
/v1/chat/completions, `complete` sends the line as a raw prompt to
/v1/completions; both print the answer as it streams in. EOF or /exit ends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TextIO

import httpx

EXIT_COMMANDS = ("/exit", "/quit")
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class ServerError(Exception):
    """The server refused a request or failed it mid-stream; the message is the server's."""


@dataclass(frozen=True)
class Sampling:
    """What every request asks for besides its prompt; None leaves the server's default."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None

    def body(self) -> dict:
        fields = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature}
        return {key: value for key, value in fields.items() if value is not None}


def open_client(url: str, api_key: Optional[str], timeout_s: float = 300.0) -> httpx.Client:
    """An HTTP client of the server at `url`, sending the API key (if any) with every request."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, trust_env=False)


def chat(client: httpx.Client, sampling: Sampling, system: Optional[str], lines: TextIO, out: TextIO,
         err: TextIO) -> int:
    """Talk until EOF or /exit, keeping the conversation; 1 when any turn failed, else 0."""
    messages = [{"role": "system", "content": system}] if system else []
    status = 0
    for text in read_turns(lines, out):
        messages.append({"role": "user", "content": text})
        reply = answer(client, CHAT_PATH, {**sampling.body(), "messages": messages}, chat_text, out, err)
        if reply is None:
            messages.pop()  # a failed turn leaves no trace in the conversation
            status = 1
        else:
            messages.append({"role": "assistant", "content": reply})
    return status


def complete(client: httpx.Client, sampling: Sampling, prompts: Iterable[str], out: TextIO, err: TextIO) -> int:
    """Stream the completion of every prompt; 1 when any failed, else 0."""
    failures = [answer(client, COMPLETIONS_PATH, {**sampling.body(), "prompt": p}, completion_text, out, err) is None
                for p in prompts]
    return int(any(failures))


def read_turns(lines: TextIO, out: TextIO, prompt: str = "> ") -> Iterator[str]:
    """Each non-blank line until EOF or /exit; `prompt` is shown before each when reading a terminal."""
    is_terminal = lines.isatty()
    while True:
        if is_terminal:
            out.write(prompt)
            out.flush()
        line = lines.readline()
        text = line.rstrip("\n")
        if not line or text.strip() in EXIT_COMMANDS:
            return
        if text.strip():
            yield text


def answer(client: httpx.Client, path: str, body: dict, text_of: Callable[[dict], str], out: TextIO,
           err: TextIO) -> Optional[str]:
    """Stream one answer to `out` and end its line; None, with the reason written to `err`, when it failed."""
    pieces, reason = [], None
    try:
        for piece in stream_pieces(client, path, body, text_of):
            out.write(piece)
            out.flush()
            pieces.append(piece)
    except ServerError as exc:
        reason = str(exc)
    except httpx.HTTPError as exc:
        reason = f"{client.base_url}: {type(exc).__name__}: {exc}"
    if pieces or reason is None:
        out.write("\n")
        out.flush()
    if reason is not None:
        err.write(f"error: {reason}\n")
        err.flush()
        return None
    return "".join(pieces)


def stream_pieces(client: httpx.Client, path: str, body: dict, text_of: Callable[[dict], str]) -> Iterator[str]:
    """POST `body` as a stream; each piece of the answer's text as it arrives."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            raise ServerError(f"HTTP {response.status_code}: {error_message(response.read())}")
        for chunk in sse_chunks(response.iter_lines()):
            if chunk.get("error"):
                raise ServerError(error_message(chunk))
            yield "".join(text_of(choice) for choice in chunk.get("choices") or [])


def sse_chunks(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON payloads of the `data:` lines up to `data: [DONE]`, which a complete stream ends with."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError as exc:
            raise ServerError(f"the stream sent something that is not JSON: {data[:200]!r}") from exc
    raise ServerError("the stream ended before its [DONE]")


def error_message(answer: bytes | dict) -> str:
    """The server's message from an error body in either shape: OpenAI's {"error": {"message"}} or ours."""
    body = answer
    if isinstance(answer, bytes):
        try:
            body = json.loads(answer)
        except ValueError:
            return answer.decode(errors="replace")[:200]
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message or body)[:2000]


def chat_text(choice: dict) -> str:
    return (choice.get("delta") or {}).get("content") or ""


def completion_text(choice: dict) -> str:
    return choice.get("text") or ""
