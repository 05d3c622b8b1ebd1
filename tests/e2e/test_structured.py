"""Structured output through the real master and agent (the random-weight default model): sampled outputs
follow their constraints, and a constraint the unconstrained greedy output already satisfies changes nothing."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re

import jsonschema
import pytest

from llmserve.common.config import load_config, packaged_config
from llmserve.common.errors import RequestError
from llmserve.common.sampling import SamplingParams, StructuredOutput
from llmserve.master.offline import OfflineEngine
from llmserve.master.tokenizer import decode
from llmserve.tools.bench_structured import random_schema
from llmserve.tools.local_config import write_local_config

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("structured")
    config = load_config(write_local_config(packaged_config(), str(directory)))
    config = dataclasses.replace(  # n-gram speculation on: constrained sequences verify proposals too
        config, serving_config=dataclasses.replace(config.serving_config, step_trace_path=str(directory / "steps.jsonl")),
        speculative_config=dataclasses.replace(config.speculative_config, method="ngram"))
    loop = asyncio.new_event_loop()
    engine = OfflineEngine(config)
    loop.run_until_complete(engine.__aenter__())
    try:
        yield engine, loop
    finally:
        loop.run_until_complete(engine.__aexit__(None, None, None))
        loop.close()


def generate(llm, constraints: list[StructuredOutput], **params) -> list[list[int]]:
    engine, loop = llm

    async def run():
        outputs = await asyncio.gather(*(engine.generate([PROMPT], SamplingParams(structured=c, **params))
                                         for c in constraints))
        return [o[0].output_ids for o in outputs]
    return loop.run_until_complete(run())


def text_of(llm, ids: list[int]) -> str:
    engine, _ = llm
    eos = set(engine.engine.model.eos_token_ids)
    return decode(engine.engine.tokenizer, [i for i in ids if i not in eos])


def test_fifty_random_schemas_sampled_at_temperature_one_parse_and_validate(llm):
    rng = random.Random(17)
    schemas = [{"type": "object", "properties": {"v": random_schema(rng)}, "required": ["v"],
                "additionalProperties": False} for _ in range(50)]
    constraints = [StructuredOutput("json", json.dumps(s)) for s in schemas]
    outputs = generate(llm, constraints, max_new_tokens=256, do_sample=True, temperature=1.0, seed=5)
    for schema, ids in zip(schemas, outputs):
        jsonschema.validate(json.loads(text_of(llm, ids)), schema)  # raises with the instance and the schema


def test_regex_choice_grammar_and_any_json_object_outputs_match(llm):
    constraints = [
        StructuredOutput("regex", r"[a-z]{3,8}@[a-z]{2,6}\.(com|org)"),
        StructuredOutput("choice", json.dumps(["yes", "no", "not sure"])),
        StructuredOutput("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,2}/'),
        StructuredOutput("json_object"),
    ]
    for seed in range(3):
        regex, choice, grammar, obj = (text_of(llm, ids) for ids in generate(
            llm, constraints, max_new_tokens=400, do_sample=True, temperature=0.7, seed=seed))
        assert re.fullmatch(r"[a-z]{3,8}@[a-z]{2,6}\.(com|org)", regex)
        assert choice in ("yes", "no", "not sure")
        assert re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", grammar)
        assert isinstance(json.loads(obj), dict)


def test_a_constraint_the_greedy_output_already_meets_changes_nothing(llm):
    engine, _ = llm
    eos = engine.engine.model.eos_token_ids
    plain, = generate(llm, [None], max_new_tokens=12, ignore_eos=True)
    while "\ufffd" in text_of(llm, plain) or set(plain) & set(eos):  # whole characters, no end token
        plain = plain[:-1]
    assert len(plain) >= 6, "the greedy output should have a clean prefix to constrain to"
    choice = StructuredOutput("choice", json.dumps([text_of(llm, plain), "something else"]))
    constrained, = generate(llm, [choice], max_new_tokens=40)
    assert constrained[:-1] == plain and constrained[-1] in eos


def test_constrained_steps_overlap_and_sample_what_steps_one_at_a_time_do(llm):
    engine, _ = llm
    rng = random.Random(3)
    constraints = [StructuredOutput("json", json.dumps({"type": "object", "properties": {"v": random_schema(rng)},
                                                        "required": ["v"]})) for _ in range(3)]
    constraints += [StructuredOutput("regex", r"[a-z]{3,8}@[a-z]{2,6}\.(com|org)"), None]  # and one unconstrained
    params = dict(max_new_tokens=60, do_sample=True, temperature=1.0, seed=11, speculative=False)
    trace = engine.engine.config.serving_config.step_trace_path
    engine.engine.overlap = False
    try:
        one_at_a_time = generate(llm, constraints, **params)
    finally:
        engine.engine.overlap = True
    with open(trace) as file:
        seen = len(file.readlines())
    overlapped = generate(llm, constraints, **params)
    assert overlapped == one_at_a_time
    with open(trace) as file:
        steps = [json.loads(line) for line in file.readlines()[seen:]]
    ahead = [step for step in steps if step["overlapped"]]
    assert len(ahead) > len(steps) // 2, "constrained decode steps should be planned while the one before runs"
    waited = [step for step in steps if "wait_masks" in step["agent_ms"]]
    assert waited and all(step["overlapped"] for step in waited)  # only steps planned ahead get their masks late
    assert len(waited) == sum("masks" in step["master_ms"] for step in steps)  # made after the step before landed


def test_constrained_sequences_verify_the_proposals_their_grammar_allows_and_sample_the_same(llm):
    engine, _ = llm
    speculator = engine.engine.scheduler.speculator
    repetitive = {"type": "array", "minItems": 12, "maxItems": 12, "items": {"enum": ["hot", "cold"]}}
    constraints = [StructuredOutput("json", json.dumps(repetitive)), StructuredOutput("regex", "(ab|cd){15}"),
                   StructuredOutput("json", json.dumps({"type": "object", "properties": {"v": random_schema(
                       random.Random(8))}, "required": ["v"]}))]
    for seed in range(2):
        params = dict(max_new_tokens=100, do_sample=True, temperature=1.0, seed=seed)
        plain = generate(llm, constraints, speculative=False, **params)
        accepted = speculator.num_accepted_tokens
        speculated = generate(llm, constraints, **params)
        assert speculated == plain  # a proposal is accepted only where the masked sample equals it
        assert speculator.num_accepted_tokens > accepted
    assert len(json.loads(text_of(llm, speculated[0]))) == 12 and re.fullmatch("(ab|cd){15}", text_of(llm, speculated[1]))


@pytest.mark.parametrize("constraint, problem", [
    (StructuredOutput("regex", "[a-", "structured_outputs.regex"), "structured_outputs.regex: .*regex"),
    (StructuredOutput("json", '{"type": "object", "properties": {"a": {"type": "string", "pattern": "(x"}}}',
                      "response_format.json_schema.schema"), "response_format.json_schema.schema:"),
    (StructuredOutput("grammar", "start: nothing_defined", "structured_outputs.grammar"), "structured_outputs.grammar:"),
])
def test_a_constraint_the_library_refuses_is_a_request_error_naming_the_field(llm, constraint, problem):
    engine, loop = llm
    with pytest.raises(RequestError, match=problem):
        loop.run_until_complete(engine.engine.prepare(SamplingParams(structured=constraint)))
