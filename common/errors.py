"""Error types shared by the master and the agents; each maps to one HTTP status."""
from __future__ import annotations

from typing import Optional


class LLMServeError(Exception):
    """Base of every error this project raises on purpose."""

    status_code = 500


class ConfigError(LLMServeError):
    """The configuration file is unreadable or has a bad key or value."""


class RequestError(LLMServeError):
    """The client sent something we cannot serve; the message says what to change, `param` which field."""

    status_code = 400

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class ModelNotFound(LLMServeError):
    """The path names a model this server does not serve."""

    status_code = 404


class Overloaded(LLMServeError):
    """The request queue is full; the client should retry later."""

    status_code = 503


class AgentFailure(LLMServeError):
    """An agent died, failed to start, or stopped answering."""

    status_code = 503
