"""Error bodies of the HTTP API, and the API-key check in front of every route but /health.

Two shapes, chosen by path: our own `/models/...` routes answer
`{"error": message, "error_type": type}` (as before); every other route answers
OpenAI's `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients
raise the right exception with the server's message.
"""
from __future__ import annotations

import hmac
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import LLMServeError, RequestError
from master.api_schema import OPEN_PATHS

NATIVE_PREFIX = "/models/"
STATUS_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


def error_response(path: str, status: int, code: str, message: str, param: Optional[str] = None) -> JSONResponse:
    """The error in the shape the route's clients expect."""
    if path.startswith(NATIVE_PREFIX):
        return JSONResponse({"error": message, "error_type": code}, status_code=status)
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


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
