"""OpenAPI for routes that answer JSON, or server-sent events with `stream: true`."""
from __future__ import annotations

from typing import Annotated, Callable, Optional

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from llmserve.common.sampling import MAX_INT32, MAX_SEED

OPEN_PATHS = ("/health",)  # answered without the API key (health checks)


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Request field types, so the schema states each range. Counts, token ids and top_k travel in the step
# arrays as int32, seeds as int64. The config's limits (max_n, ...) and the vocabulary's size differ by
# server: finish_openapi adds them.
INTEGRAL = BeforeValidator(_integral)  # JSON Schema's integers include 2.0, so ours do too
Count = Annotated[int, Field(ge=0, le=MAX_INT32), INTEGRAL]
PositiveCount = Annotated[int, Field(ge=1, le=MAX_INT32), INTEGRAL]
AtLeastOne = Annotated[int, Field(ge=1), INTEGRAL]
NonNegative = Annotated[int, Field(ge=0), INTEGRAL]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), INTEGRAL]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32), INTEGRAL]
StopString = Annotated[str, Field(min_length=1)]


# Rules between request fields that JSON Schema can state (a model's json_schema_extra); the others, such as
# min_tokens <= max_tokens, are only checked.
def when(condition: dict, then: dict) -> dict:
    return {"if": condition, "then": then}


def is_set(name: str) -> dict:
    """The field is present and not null."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def equals(name: str, value: object) -> dict:
    return {"required": [name], "properties": {name: {"const": value}}}


def fields(**schemas: dict) -> dict:
    """The fields that are present match these schemas."""
    return {"properties": schemas}


BEAM_SEARCH = {"required": ["num_beams"], "properties": {"num_beams": {"type": "integer", "minimum": 2}}}
ABSENT = {"type": "null"}  # in `fields`: absent or null
NOT_TRUE = {"not": {"const": True}}


class Answer(BaseModel):
    """A response body: every field it may carry is declared, so extra fields fail validation in the tests."""

    model_config = ConfigDict(extra="forbid")


def finish_openapi(
    app: FastAPI, stream_models: tuple, key_error: Optional[Callable[[str], type]], limits: dict[str, dict[str, dict]]
) -> None:
    """Make the app's schema say what the server does.

    Adds the stream event models (no route returns them as JSON); writes the server's
    `limits` into the request schemas ({schema: {field: {"maximum": m, "max_items": k}}});
    drops FastAPI's 422 answers (bad bodies are 400s in the route's error shape); with an
    API key (`key_error`: path -> its error model), declares the bearer scheme and the 401
    on every route but the open ones.
    """
    build_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build_schema()
            schemas = schema["components"]["schemas"]
            for model in stream_models:
                _add_model(schemas, model)
            for name, fields in limits.items():
                for field, bounds in fields.items():
                    _limit(schemas[name]["properties"][field], **bounds)
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


def _limit(schema: dict, maximum: Optional[int] = None, max_items: Optional[int] = None) -> None:
    """Bound the integers of a field's schema (through nullable and union members and list items), and its length."""
    if maximum is not None and schema.get("type") == "integer":
        schema["maximum"] = min(maximum, schema.get("maximum", maximum))
    if max_items is not None and schema.get("type") == "array":
        schema["maxItems"] = max_items
    for member in (*schema.get("anyOf", ()), *schema.get("oneOf", ())):
        _limit(member, maximum, max_items)
    if isinstance(schema.get("items"), dict):
        _limit(schema["items"], maximum)


def _add_model(schemas: dict, model: type) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault(model.__name__, schema)


def _require_key(schemas: dict, operation: dict, error_model: type) -> None:
    _add_model(schemas, error_model)
    operation["security"] = [{"bearer": []}]
    operation["responses"]["401"] = {
        "description": "Missing or wrong API key", "content": {"application/json": {"schema": _ref(error_model)}}
    }


def stream_response(answer: type, event: type, errors: dict, end_marker: Optional[str] = None) -> dict:
    """OpenAPI responses of a route that answers `answer` as JSON, or `event`s with `stream: true`.

    Each server-sent event is described as OpenAPI 3.2 describes one: an object whose `data` is JSON,
    an `event` or (after a failure, last) the route's error body, or else the `end_marker`.
    """
    error = errors[400]["model"]
    payload = {"anyOf": [_ref(event), _ref(error)]}
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    if end_marker is not None:
        data = {"anyOf": [data, {"const": end_marker}]}
    events = {"schema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}
    description = (
        f"{answer.__name__}; with `stream: true`, `data: {{{event.__name__}}}` events "
        "(a failure during the stream is one last event with `error`)"
    )
    if end_marker is not None:
        description += f", then `data: {end_marker}`"
    return {200: {"model": answer, "description": description, "content": {"text/event-stream": events}}, **errors}


def _ref(model: type) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}
