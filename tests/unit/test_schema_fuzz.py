"""Schemathesis against the published OpenAPI schema: every route, the real engine over the fake agent.

All of schemathesis' checks run (server errors, status codes, content types, response bodies
and server-sent events against their schemas, schema-valid data accepted, schema-invalid data
refused, undeclared methods answered 405 with Allow, ...), with derandomized generation.
"""
from __future__ import annotations

import collections
import contextlib
import json

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema
from schemathesis.generation import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans

from llmserve.master.api import create_app
from tests.unit.fake_agent import fake_engine

MAX_EXAMPLES = 25  # per operation and phase; the coverage phase adds each field's boundary values


@schemathesis.check
def schema_valid_bodies_pass_validation(ctx, response, case) -> None:
    """Schema-valid data may only be refused by a rule between fields, never by the body's validation.

    `positive_data_acceptance` has to allow 400 (see below); this check keeps that allowance from hiding a
    schema that says less than the validation does: such a 400 would be a `validation_error`.
    """
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE or response.status_code != 400:
        return
    body = json.loads(response.content)
    code = body["error"]["code"] if isinstance(body["error"], dict) else body["error_type"]  # OpenAI's shape, or ours
    assert code != "validation_error", f"schema-valid data failed validation: {body}"


def fuzz_config(model_name: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "seed": 0,
        "generation": {"deterministic": True, "max-examples": MAX_EXAMPLES, "database": "none"},
        "parameters": {"path.name": model_name},  # the generate route, for the served model
        "checks": {
            # JSON Schema cannot compare two fields, nor count a prompt's tokens: min_tokens <= max_tokens,
            # n <= best_of (> n only when sampling), n <= num_beams, (1 + end tokens) x num_beams within the
            # candidates the agents return, prompt + max tokens within the context and the KV cache. Schema-valid
            # data breaking one of those is a 400 naming the field (the schema states every other rule);
            # schema_valid_bodies_pass_validation checks that only those are. A `model` other than the served one
            # is a 404, as in OpenAI's API.
            "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]},
        },
    })


@pytest.fixture(scope="module")
def schema():
    engine = fake_engine()
    app = create_app(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_app):  # schemathesis runs the app, and so the engine, in its own event loop
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app.router.lifespan_context = lifespan
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config(engine.config.model_config.model_name))
    finally:
        shutdown_lifespans()


def test_fuzzing_every_route_finds_no_server_error_and_no_schema_violation(schema):
    num_cases, statuses, failures, errors = 0, collections.Counter(), [], []
    for event in from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            errors.append(repr(event.exception))
        elif isinstance(event, events.ScenarioFinished):
            num_cases += len(event.recorder.cases)
            statuses.update(_statuses(event.recorder))
            failures += _failures(event.recorder)
    assert not errors, errors
    assert not failures, "\n\n".join(failures[:5])
    assert not [key for key in statuses if key[1] == 5]
    assert num_cases >= 300
    for route in ("POST /models/{name}/generate", "POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"):
        assert statuses[(route, 2)] > 0, f"{route}: no request was answered 200"


def _statuses(recorder) -> collections.Counter:
    """(operation, status class) of every answer."""
    answers = [interaction.response for interaction in recorder.interactions.values()]
    return collections.Counter((recorder.label, answer.status_code // 100) for answer in answers if answer is not None)


def _failures(recorder) -> list[str]:
    return [
        f"{recorder.label} {check.name}: {check.failure_info.failure}"
        for checks in recorder.checks.values() for check in checks if check.failure_info is not None
    ]
