"""OpenAPI for routes that answer JSON, or server-sent events with `stream: true`."""
from __future__ import annotations

from typing import Callable, Optional

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict


OPEN_PATHS = ("/health",)  # answered without the API key (health checks)


class Answer(BaseModel):
    """A response body: every field it may carry is declared, so extra fields fail validation in the tests."""

    model_config = ConfigDict(extra="forbid")


def finish_openapi(app: FastAPI, stream_models: tuple, key_error: Optional[Callable[[str], type]]) -> None:
    """Make the app's schema say what the server does.

    Adds the stream event models (no route returns them as JSON); drops FastAPI's
    422 answers (bad bodies are 400s in the route's error shape); with an API key
    (`key_error`: path -> its error model), declares the bearer scheme and the 401
    on every route but the open ones.
    """
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build_schema()
            schemas = schema["components"]["schemas"]
            for model in stream_models:
                _add_model(schemas, model)
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if key_error is not None and path not in OPEN_PATHS:
                        _require_key(schemas, operation, key_error(path))
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            if key_error is not None:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        return app.openapi_schema

    app.openapi = openapi


def _add_model(schemas: dict, model: type) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault(model.__name__, schema)


def _require_key(schemas: dict, operation: dict, error_model: type) -> None:
    _add_model(schemas, error_model)
    operation["security"] = [{"bearer": []}]
    error = {"$ref": f"#/components/schemas/{error_model.__name__}"}
    operation["responses"]["401"] = {
        "description": "Missing or wrong API key", "content": {"application/json": {"schema": error}}
    }


def stream_response(answer: type, event: type, errors: dict) -> dict:
    """OpenAPI responses of a route that answers `answer` as JSON, or `event`s with `stream: true`."""
    events = {"schema": {"$ref": f"#/components/schemas/{event.__name__}"}}
    description = (
        f"{answer.__name__}; with `stream: true`, `data: {{{event.__name__}}}` events "
        "(a failure during the stream is one last event with `error`)"
    )
    return {200: {"model": answer, "description": description, "content": {"text/event-stream": events}}, **errors}
