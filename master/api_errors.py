"""Error bodies of the HTTP API, and the API-key check in front of every route but /health.

Two shapes, chosen by path: our own `/models/...` routes answer
`{"error": message, "error_type": type}` (as before); every other route answers
OpenAI's `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients
raise the right exception with the server's message.
"""
from __future__ import annotations

import hmac
import json
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.common.errors import LLMServeError, RequestError
from llmserve.master.api_schema import OPEN_PATHS

NATIVE_PREFIX = "/models/"
STATUS_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ErrorJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may quote the client's text, which can hold
    a lone surrogate that UTF-8 cannot encode."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(path: str, status: int, code: str, message: str, param: Optional[str] = None) -> JSONResponse:
    """The error in the shape the route's clients expect."""
    if path.startswith(NATIVE_PREFIX):
        return ErrorJSON({"error": message, "error_type": code}, status_code=status)
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return ErrorJSON(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Bad bodies, our own errors and unknown routes all answer in the path's error shape."""

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(request.url.path, 400, "validation_error", message, param)

    @app.exception_handler(LLMServeError)
    async def _known_error(request: Request, exc: LLMServeError) -> JSONResponse:
        param = exc.param if isinstance(exc, RequestError) else None
        return error_response(request.url.path, exc.status_code, error_code(exc), str(exc), param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = STATUS_CODES.get(exc.status_code, "http_error")
        response = error_response(request.url.path, exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client still gets the route's error shape.
        return error_response(request.url.path, 500, "internal_error", f"internal error: {type(exc).__name__}: {exc}")


def validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """One readable sentence per field at fault (the first problem of each), and the first field's name."""
    problems: dict[str, str] = {}
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"][1:] if not _is_union_member(part))
        if error["type"] == "json_invalid":
            problems.setdefault("", f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
        elif error["type"] == "extra_forbidden":
            problems.setdefault(location, f"{location}: unknown parameter")
        else:
            problems.setdefault(location, f"{location or 'body'}: {_problem(error)}")
    first = next(iter(problems), None)
    return "; ".join(problems.values()), first or None


BOUNDS = {  # pydantic's error type -> its context key and our sign
    "greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"), "less_than_equal": ("le", "<="),
}


def _problem(error: dict) -> str:
    """pydantic's message, shorter for ranges (`must be <= 3.40282e+38`, not 39 digits) and empty or always-empty lists."""
    if error["type"] == "too_long" and error["ctx"].get("max_length") == 0:
        return "not supported by this server; leave it out (or empty)"
    if error["type"] == "too_short" and error["ctx"].get("min_length") == 1:
        return "must not be empty"
    bound = BOUNDS.get(error["type"])
    if bound is None:
        return error["msg"]
    key, sign = bound
    value = error["ctx"][key]
    return f"must be {sign} {value if isinstance(value, int) else format(value, 'g')}"


def _is_union_member(part: object) -> bool:
    """pydantic names the union member it tried (`str`, `list[int]`) inside the location; the client never wrote it."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part)


def error_code(exc: LLMServeError) -> str:
    """`ModelNotFound` -> `model_not_found`."""
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class BodyLimit:
    """413, in the route's error shape, for a body over `max_bytes`: at once when its Content-Length says so
    (the body is never read), else as soon as the bytes read get there (a chunked body is never held whole).

    Starlette's own limiter (FastAPI's max_body_size) answers a declared length over the limit with plain
    text whatever the app answers, so it cannot give our error bodies.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif _declared_length(scope) > self.max_bytes:
            response = error_response(scope["path"], 413, STATUS_CODES[413], body_too_large(self.max_bytes))
            response.headers["Connection"] = "close"  # the unread body must not be taken for the next request
            await response(scope, receive, send)
        else:
            await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        num_bytes = 0

        async def counted() -> Message:
            nonlocal num_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_bytes += len(message.get("body", b""))
                if num_bytes > self.max_bytes:  # FastAPI lets an HTTPException from reading the body reach our handler
                    raise HTTPException(413, body_too_large(self.max_bytes))
            return message

        return counted


def body_too_large(max_bytes: int) -> str:
    return f"the request body is over the {max_bytes} bytes this server accepts (serving_config.max_request_body_bytes)"


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


class ApiKeyMiddleware:
    """401 for any request without `Authorization: Bearer <key>`, except the open paths (health checks)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(scope["path"], 401, "invalid_api_key", "missing or wrong API key: send Authorization: Bearer <key>")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, key = value.partition(b" ")
                return hmac.compare_digest(scheme.lower() + b" " + key.strip(), self.expected)
        return False
