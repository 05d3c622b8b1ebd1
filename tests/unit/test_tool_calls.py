"""Tool calling: the forced-call constraint, the free-text parsers, and how replies and streams are shaped."""
from __future__ import annotations

import json

import jsonschema
import pytest

from llmserve.common.errors import ConfigError
from llmserve.master.tool_calls import (
    ToolCall, ToolCallStream, ToolReply, forced_calls, forced_constraint, parse_hermes, parse_llama3_json,
    parse_mistral, parser_for,
)

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}  # no parameters: an empty object


def test_the_required_constraint_is_an_array_of_calls_of_the_given_tools():
    constraint = forced_constraint([WEATHER, CLOCK], None)
    assert (constraint.kind, constraint.name) == ("json", "tool_choice")
    schema = json.loads(constraint.value)
    good = [{"name": "weather", "parameters": {"city": "Oslo"}}, {"name": "clock", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "weather", "parameters": {}}], [{"name": "radio", "parameters": {}}],
                [{"name": "clock", "parameters": {}, "extra": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert forced_calls(json.dumps(good), None) == [
        ToolCall("weather", '{"city": "Oslo"}'), ToolCall("clock", "{}")]
    assert forced_calls('[{"name": "weather", "parameters": {"ci', None) is None  # cut short


def test_required_keeps_each_tools_definitions_and_key_order_and_allows_one_call_without_parallel_calls():
    point = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"$ref": "#/$defs/Unit"}},
             "required": ["zeta", "alpha"], "$defs": {"Unit": {"enum": ["c", "f"]}}}
    tools = [WEATHER, {"type": "function", "function": {"name": "point", "parameters": point}}]
    schema = json.loads(forced_constraint(tools, None, parallel=False).value)
    assert schema["maxItems"] == 1 and schema["$defs"] == {"tool1_Unit": {"enum": ["c", "f"]}}
    parameters = schema["items"]["anyOf"][1]["properties"]["parameters"]
    assert list(parameters["properties"]) == ["zeta", "alpha"]  # the order the output keys come in
    assert parameters["properties"]["alpha"] == {"$ref": "#/$defs/tool1_Unit"} and "$defs" not in parameters
    jsonschema.validate([{"name": "point", "parameters": {"zeta": 1, "alpha": "c"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "point", "parameters": {"zeta": 1, "alpha": "k"}}], schema)


def test_a_named_function_is_constrained_to_its_parameters():
    constraint = forced_constraint([WEATHER, CLOCK], "weather")
    assert json.loads(constraint.value) == WEATHER["function"]["parameters"]
    assert json.loads(forced_constraint([WEATHER, CLOCK], "clock").value) == {"type": "object", "properties": {}}
    assert forced_calls('{"city": "Oslo"}', "weather") == [ToolCall("weather", '{"city": "Oslo"}')]


def test_the_forced_constraints_compile_with_the_grammar_library():
    from llmserve.master.structured import GrammarCompiler
    from tests.unit.fake_agent import TOKENIZER

    compiler = GrammarCompiler(TOKENIZER.to_str(), TOKENIZER.get_vocab_size(), eos_token_ids=[2])
    point = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Place"}}, "required": ["at"],
             "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    tools = [WEATHER, CLOCK, {"type": "function", "function": {"name": "point", "parameters": point}}]
    for name in (None, "weather", "clock", "point"):
        compiler.compile(forced_constraint(tools, name))


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "",
     [ToolCall("weather", '{"city": "Oslo"}')]),
    ('Let me look.\n<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
     '<tool_call>{"name": "clock", "arguments": {}}</tool_call>', "Let me look.\n\n",
     [ToolCall("weather", '{"city": "Oslo"}'), ToolCall("clock", "{}")]),
    ('<tool_call>{"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', "",
     [ToolCall("weather", '{"city": "Oslo"}')]),  # arguments given as JSON text
    ("<tool_call>{not json}</tool_call> and more", "<tool_call>{not json}</tool_call> and more", []),
    ("It is sunny.", "It is sunny.", []),
])
def test_hermes_finds_tagged_calls_and_keeps_the_rest_as_content(text, content, calls):
    assert parse_hermes(text) == (content, calls)


@pytest.mark.parametrize("text, content, calls", [
    ('{"name": "weather", "parameters": {"city": "Oslo"}}', "", [ToolCall("weather", '{"city": "Oslo"}')]),
    ('<|python_tag|>{"name": "weather", "parameters": {"city": "Oslo"}}; {"name": "clock", "parameters": {}}', "",
     [ToolCall("weather", '{"city": "Oslo"}'), ToolCall("clock", "{}")]),
    ('{"name": "run", "parameters": {"cmd": "a; b"}}; {"name": "clock", "parameters": {}}', "",
     [ToolCall("run", '{"cmd": "a; b"}'), ToolCall("clock", "{}")]),  # a semicolon inside a string
    ('{"name": "run", "parameters": 3}', '{"name": "run", "parameters": 3}', []),  # arguments not an object
    ('{"city": "Oslo"}', '{"city": "Oslo"}', []),  # JSON, but not a call
    ("Hello {there}", "Hello {there}", []),
])
def test_llama3_json_takes_calls_after_the_python_tag_or_as_the_whole_text(text, content, calls):
    assert parse_llama3_json(text) == (content, calls)


@pytest.mark.parametrize("text, content, calls", [
    ('[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo"}}]', "", [ToolCall("weather", '{"city": "Oslo"}')]),
    ('Sure. [TOOL_CALLS] {"name": "clock", "arguments": {}}', "Sure. ", [ToolCall("clock", "{}")]),
    ('[TOOL_CALLS] {"name": "clock", "arguments": {}}, {"name": "clock", "arguments": {"x": 1}}', "",
     [ToolCall("clock", "{}"), ToolCall("clock", '{"x": 1}')]),
    ('[{"name": "weather", "arguments": {"city": "Oslo"}}]', "", [ToolCall("weather", '{"city": "Oslo"}')]),
    ("[1, 2]", "[1, 2]", []),
    ("[TOOL_CALLS] nonsense", "[TOOL_CALLS] nonsense", []),
])
def test_mistral_takes_the_array_after_the_marker_or_alone(text, content, calls):
    assert parse_mistral(text) == (content, calls)


def test_the_parser_follows_the_setting_or_the_templates_text():
    assert parser_for("mistral", "{{ messages }}") == "mistral"
    assert parser_for("auto", "{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert parser_for("auto", "[TOOL_CALLS]") == "mistral"
    assert parser_for("auto", "<|start_header_id|>ipython<|end_header_id|>") == "llama3_json"
    assert parser_for("auto", "{{ message.content }}") is None
    assert parser_for("none", "<tool_call>") is None
    with pytest.raises(ConfigError, match="tool_call_parser"):
        parser_for("xml", "")


def test_replies_read_by_mode_with_openais_finish_reasons():
    auto = ToolReply("auto", parser="hermes", tool_names=frozenset({"clock", "weather"}))
    call = '<tool_call>{"name": "clock", "arguments": {}}</tool_call>'
    assert auto.parse(call) == (None, [ToolCall("clock", "{}")])
    assert auto.parse("plain") == ("plain", [])
    assert auto.parse("Here.\n" + call) == ("Here.\n", [ToolCall("clock", "{}")])
    unknown = '<tool_call>{"name": "radio", "arguments": {}}</tool_call>'
    assert auto.parse(unknown) == (unknown, [])  # not one of the tools: no call
    single = ToolReply("auto", parser="hermes", tool_names=frozenset({"clock"}), parallel=False)
    assert single.parse(call + call) == (None, [ToolCall("clock", "{}")])
    assert auto.finish_reason([ToolCall("clock", "{}")], "stop") == "tool_calls"
    assert auto.finish_reason([], "stop") == "stop"
    named = ToolReply("named", name="weather")
    assert named.parse('{"city": "Os') == (None, [ToolCall("weather", '{"city": "Os')])  # cut short as it came
    assert named.finish_reason(named.parse("{}")[1], "stop") == "stop"  # as OpenAI does for a named function
    required = ToolReply("required")
    assert required.parse('[{"name": "clock", "parameters": {}}]') == (None, [ToolCall("clock", "{}")])
    assert required.parse('[{"name": "clo') == ('[{"name": "clo', [])
    assert required.finish_reason([], "length") == "length"


def stream_of(reply: ToolReply, pieces: list[str], finish: str = "stop") -> list[tuple[dict, str]]:
    stream = ToolCallStream(reply)
    return [stream.delta(piece, finish if i == len(pieces) - 1 else None) for i, piece in enumerate(pieces)]


def without_ids(delta: dict) -> dict:
    calls = [{k: v for k, v in call.items() if k != "id"} for call in delta.get("tool_calls", ())]
    return {**delta, "tool_calls": calls} if calls else delta


def test_auto_streams_content_until_a_call_may_start_then_sends_whole_calls_at_the_end():
    pieces = ["Let me ", "look.\n<tool", '_call>{"name": "clock", ', '"arguments": {}}</tool_call>', ""]
    deltas = stream_of(ToolReply("auto", parser="hermes", tool_names=frozenset({"clock"})), pieces)
    assert [d for d, _ in deltas[:4]] == [{"content": "Let me "}, {"content": "look.\n"}, {}, {}]
    last, finish = deltas[-1]
    assert finish == "tool_calls"
    assert without_ids(last) == {"tool_calls": [{"index": 0, "type": "function",
                                                 "function": {"name": "clock", "arguments": "{}"}}]}
    assert last["tool_calls"][0]["id"].startswith("call_")


def test_auto_text_that_only_looked_like_a_call_comes_out_as_content():
    deltas = stream_of(ToolReply("auto", parser="hermes", tool_names=frozenset({"clock"})), ["a <tool", "box> b", " <tool_call>oops"], finish="length")
    assert "".join(d.get("content", "") for d, _ in deltas) == "a <toolbox> b <tool_call>oops"
    assert deltas[1][0] == {"content": "<toolbox> b"} and deltas[-1][1] == "length"


def test_auto_with_a_bare_json_parser_holds_a_reply_that_opens_with_its_first_character():
    reply = ToolReply("auto", parser="llama3_json", tool_names=frozenset({"clock"}))
    deltas = stream_of(reply, ["  ", '{"name": "clock",', ' "parameters": {}}'])
    assert [d for d, _ in deltas[:2]] == [{}, {}] and deltas[-1][1] == "tool_calls"
    assert [c["function"]["name"] for c in deltas[-1][0]["tool_calls"]] == ["clock"]
    plain = stream_of(reply, [" Hi", " {there}"])
    assert [d for d, _ in plain] == [{"content": " Hi"}, {"content": " {there}"}]


def test_a_named_call_streams_its_arguments_as_they_come():
    deltas = stream_of(ToolReply("named", name="weather"), ['{"city', '": "Oslo"}', ""])
    first = deltas[0][0]["tool_calls"][0]
    assert first["id"].startswith("call_") and first["function"] == {"name": "weather", "arguments": '{"city'}
    assert deltas[1][0] == {"tool_calls": [{"index": 0, "function": {"arguments": '": "Oslo"}'}}]}
    assert deltas[2] == ({}, "stop")


def test_required_holds_everything_and_gives_the_text_back_when_it_was_cut_short():
    reply = ToolReply("required")
    whole = stream_of(reply, ['[{"name": "clock", ', '"parameters": {}}]'])
    assert whole[0] == ({}, None) and whole[1][1] == "tool_calls"
    cut = stream_of(reply, ['[{"name": "clo'], finish="length")
    assert cut == [({"content": '[{"name": "clo'}, "length")]
