"""OpenAPI for routes that answer JSON, or server-sent events with `stream: true`."""
from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict


class Answer(BaseModel):
    """A response body: every field it may carry is declared, so extra fields fail validation in the tests."""

    model_config = ConfigDict(extra="forbid")


def add_stream_schemas(app: FastAPI, models: tuple) -> None:
    """Put the stream event models, which no route returns as JSON, into the app's OpenAPI components."""
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = build_schema()["components"]["schemas"]
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
                for name, definition in schema.pop("$defs", {}).items():
                    schemas.setdefault(name, definition)
                schemas.setdefault(model.__name__, schema)
        return app.openapi_schema

    app.openapi = openapi


def stream_response(answer: type, event: type, errors: dict) -> dict:
    """OpenAPI responses of a route that answers `answer` as JSON, or `event`s with `stream: true`."""
    events = {"schema": {"$ref": f"#/components/schemas/{event.__name__}"}}
    description = f"{answer.__name__}; with `stream: true`, `data: {{{event.__name__}}}` events"
    return {200: {"model": answer, "description": description, "content": {"text/event-stream": events}}, **errors}
