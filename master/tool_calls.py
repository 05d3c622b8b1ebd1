"""Tool calling in chat: the constraint that forces a call, and the parsers that find calls in free text.

- tool_choice `required` or a named function: the output is constrained (master/structured.py) to a JSON
  array of {"name", "parameters"} objects, one of the tools each (required), or to the named function's
  parameters (named), so it always parses.
- tool_choice `auto`: the tools are rendered through the chat template and the model decides; the reply is
  parsed by the parser of the template's family: `hermes` (Hermes, Qwen: <tool_call>{...}</tool_call>),
  `llama3_json` (Llama 3.x: {"name": ..., "parameters": ...}, after <|python_tag|> or alone) or `mistral`
  ([TOOL_CALLS][{...}, ...]). `model_config.tool_call_parser` names one; `auto` picks by the template's text.
  Text that does not parse is the reply's content, as it is. Replies are decoded without special tokens, so a
  marker that is a special token of the tokenizer (Llama's <|python_tag|>, Mistral's [TOOL_CALLS]) is gone from
  the text: the llama3_json and mistral parsers also take the bare JSON that follows it.
- ToolReply shapes a finished reply (message content and calls, finish reason); ToolCallStream shapes the streamed
  deltas: text before a call streams as content, a named function's arguments stream as they come, and the rest
  is held until the reply ends and then sent as whole calls.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from llmserve.common.errors import ConfigError
from llmserve.common.sampling import StructuredOutput
from llmserve.master.structured import json_constraint

@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object

    def as_openai(self, index: Optional[int] = None) -> dict:
        """OpenAI's tool_calls entry (with `index` as a streamed delta's)."""
        entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": self.name, "arguments": self.arguments}}
        return entry if index is None else {"index": index, **entry}


def forced_constraint(tools: list[dict], name: Optional[str], parallel: bool = True) -> StructuredOutput:
    """The constraint of tool_choice `required` (`name` None: one call or more of any tool, one without
    `parallel`) or of the named function (its parameters object)."""
    if name is not None:
        function = next(t["function"] for t in tools if t["function"]["name"] == name)
        return json_constraint(_parameters(function), "tool_choice")
    definitions: dict = {}
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
              "properties": {"name": {"const": tool["function"]["name"]},
                             "parameters": _hoist_definitions(_parameters(tool["function"]), f"tool{index}_", definitions)}}
             for index, tool in enumerate(tools)]
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return json_constraint(schema, "tool_choice")


LOCAL_REF = re.compile(r"^#/(\$defs|definitions)/([^/]+)(.*)$")


def _hoist_definitions(schema: dict, prefix: str, into: dict) -> dict:
    """`schema` with its `$defs` / `definitions` moved into `into` under `prefix`ed names and its references to
    them rewritten: nested in the array of calls, `#/$defs/X` would name the root's."""
    schema = dict(schema)
    local = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}

    def rewrite(value: Any) -> Any:
        if isinstance(value, list):
            return [rewrite(item) for item in value]
        if not isinstance(value, dict):
            return value
        rewritten = {key: rewrite(item) for key, item in value.items()}
        match = LOCAL_REF.match(value.get("$ref", "")) if isinstance(value.get("$ref"), str) else None
        if match and match.group(2) in local:
            rewritten["$ref"] = f"#/$defs/{prefix}{match.group(2)}{match.group(3)}"
        return rewritten

    into.update((prefix + key, rewrite(definition)) for key, definition in local.items())
    return rewrite(schema)


def forced_calls(text: str, name: Optional[str]) -> Optional[list[ToolCall]]:
    """The calls in an output made under `forced_constraint` (None if it was cut short and does not parse)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if name is not None:
        return [ToolCall(name, json.dumps(value))]
    return [ToolCall(call["name"], json.dumps(call["parameters"])) for call in value]


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolReply:
    """How a chat request's replies read under its tools: `mode` auto, required or named (the function `name`);
    `parser` (auto only) finds the calls in free text."""

    mode: str
    name: Optional[str] = None
    parser: Optional[str] = None
    tool_names: frozenset[str] = frozenset()  # auto: a call of another name is no call
    parallel: bool = True  # auto: without, the first call only

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """The reply's content (None when it is all calls, or only whitespace around them) and its calls."""
        if self.mode == "named":
            return None, [ToolCall(self.name, text)]  # cut short, the arguments are cut short too, as OpenAI's
        if self.mode == "required":
            calls = forced_calls(text, None)
            return (text, []) if calls is None else (None, calls)
        content, calls = PARSE[self.parser](text)
        if not calls or any(call.name not in self.tool_names for call in calls):
            return text, []
        return (content if content.strip() else None), calls if self.parallel else calls[:1]

    def finish_reason(self, calls: list[ToolCall], finish: Optional[str]) -> Optional[str]:
        """OpenAI's: tool_calls when the model chose to call (auto, required), the engine's own for a named call."""
        return "tool_calls" if calls and self.mode != "named" and finish is not None else finish


# Where a call starts in free text: a marker anywhere, or (for parsers that take the bare JSON) a first character.
CALL_STARTS = {"hermes": ("<tool_call>", None), "mistral": ("[TOOL_CALLS]", "["), "llama3_json": ("<|python_tag|>", "{")}


class ToolCallStream:
    """One streamed choice's deltas: content until a call may start, then the calls when the reply ends; a named
    function's arguments stream as they come."""

    def __init__(self, reply: ToolReply) -> None:
        self.reply = reply
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.holding = reply.mode == "required"  # from `sent` on, the text is held for the calls
        self.named_chunks = 0

    def delta(self, text: str, finish: Optional[str]) -> tuple[dict, Optional[str]]:
        """The delta for this much more text (`finish` set on the reply's last), and the finish reason to send."""
        self.text += text
        if self.reply.mode == "named":
            return self._named(text), finish
        delta: dict = {}
        if not self.holding:
            self._send_content(delta, self._safe_end())
        if finish is None:
            return delta, None
        content, calls = self.reply.parse(self.text[self.sent :]) if self.sent < len(self.text) else (None, [])
        if content:
            delta["content"] = delta.get("content", "") + content
        if calls:
            delta["tool_calls"] = [call.as_openai(index) for index, call in enumerate(calls)]
        return delta, self.reply.finish_reason(calls, finish)

    def _named(self, text: str) -> dict:
        self.named_chunks += 1
        if self.named_chunks > 1:
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        return {"tool_calls": [ToolCall(self.reply.name, text).as_openai(0)]}

    def _send_content(self, delta: dict, end: int) -> None:
        if end > self.sent:
            delta["content"] = self.text[self.sent : end]
            self.sent = end

    def _safe_end(self) -> int:
        """How far the text may go out as content: up to a call's start (from which it is held), or short of a
        tail that could be the beginning of a marker."""
        marker, first = CALL_STARTS[self.reply.parser]
        found = self.text.find(marker, self.sent)
        if first is not None and not self.text[: self.sent].strip():
            stripped = self.text.lstrip()
            if not stripped:
                return self.sent  # only whitespace so far: the first character decides
            if stripped.startswith(first):
                found = self.sent  # the whole reply may be the call
        if found >= 0:
            self.holding = True
            return found
        tail = self.text[self.sent :]
        partial = next((n for n in range(min(len(marker) - 1, len(tail)), 0, -1) if marker.startswith(tail[-n:])), 0)
        return len(self.text) - partial


# ---------------------------------------------------------------- parsers of free text (tool_choice auto)


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    """<tool_call>{...}</tool_call> tags anywhere; the text around them is the content."""
    calls, kept = [], []
    position = 0
    for match in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
        call = _call_of(match.group(1))
        if call is None:
            continue
        kept.append(text[position : match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    return "".join(kept), calls


def parse_llama3_json(text: str) -> tuple[str, list[ToolCall]]:
    """One call as a JSON object, or several separated by semicolons, after <|python_tag|> or as the whole text."""
    content, tag, body = text.partition("<|python_tag|>")
    if not tag:
        content, body = "", text
    calls = [_call_of(value) for value in _json_values(body, ";") or ()]
    if not calls or None in calls:
        return text, []
    return content, calls


def parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    """[TOOL_CALLS] then a JSON array of calls (or one call), or that array as the whole text."""
    content, tag, body = text.partition("[TOOL_CALLS]")
    if not tag:
        content, body = "", text
    values = _json_values(body, ",")
    if not values:
        return text, []
    entries = values[0] if len(values) == 1 and isinstance(values[0], list) else values
    calls = [_call_of(entry) for entry in entries]
    if not calls or None in calls:
        return text, []
    return content, calls


def _json_values(text: str, separator: str) -> Optional[list]:
    """The JSON values `text` holds one after another (`separator` and whitespace between them), or None when
    anything else is there. Read value by value: a separator inside a string is no separator."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return values
        if values:
            if text[position] != separator:
                return None
            position += 1
            while position < len(text) and text[position].isspace():
                position += 1
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return None
        values.append(value)


def _call_of(text: Union[str, Any]) -> Optional[ToolCall]:
    """{"name": ..., "arguments" | "parameters": {...}} (as JSON text or parsed) as a call, else None: the
    arguments must be an object (or its JSON text)."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments: Any = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some templates put the arguments' JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments))


PARSE: dict[str, Callable[[str], tuple[str, list[ToolCall]]]] = {
    "hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral,
}


def parser_for(setting: str, template_text: str) -> Optional[str]:
    """The parser `setting` names; for `auto`, the one whose call marker the chat template's text holds (Llama 3
    templates that name the `ipython` role without the tag too; None: no tools)."""
    if setting in PARSE:
        return setting
    if setting == "none":
        return None
    if setting != "auto":
        raise ConfigError(f"model_config.tool_call_parser: {setting!r} is not auto, none, {', '.join(PARSE)}")
    found = next((parser for parser, (marker, _) in CALL_STARTS.items() if marker in template_text), None)
    return found or ("llama3_json" if "ipython" in template_text else None)
