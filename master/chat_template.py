"""Chat messages -> prompt text with the checkpoint's jinja chat template, rendered as transformers renders it."""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Optional

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from llmserve.common.config import ModelConfig
from llmserve.common.errors import ConfigError, RequestError

BUILTIN = "builtin"
# The embedded model's tokenizer (master/tokenizer.py BUILTIN_SPECIAL_TOKENS); it has no tokenizer_config.json.
BUILTIN_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
FALLBACK_PATH = os.path.join(os.path.dirname(__file__), "data", "fallback_chat_template.jinja")
# transformers passes every named special token it knows to the template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
RESERVED_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the one most templates read
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # the marker transformers appends to the message being continued
# Exceptions jinja lets through from operations on the messages (e.g. adding a list to a string).
RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError)


class ChatTemplate:
    """A chat template and the special-token strings it may use."""

    def __init__(self, text: str, source: str, special_tokens: dict[str, str]) -> None:
        self.text = text
        self.source = source
        self.special_tokens = special_tokens
        try:
            self.template = _environment().from_string(text)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"chat template {source}: does not compile: {exc}") from exc

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: Optional[dict] = None,
        tools: Optional[list[dict]] = None,
    ) -> str:
        """The prompt for these messages (and `tools`, as transformers passes them); with continue_final_message
        it ends inside the final message."""
        messages = _prepare_messages(messages)
        variables = self._variables(messages, add_generation_prompt, template_kwargs or {})
        variables["tools"] = tools or None
        if not continue_final_message:
            return self._render(variables)
        if add_generation_prompt:
            raise RequestError(
                "continue_final_message and add_generation_prompt cannot both be set", "add_generation_prompt"
            )
        return self._render_continuation(variables)

    def _variables(self, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> dict:
        for name in RESERVED_VARIABLES:
            if name in template_kwargs:
                raise RequestError(f"chat_template_kwargs: {name!r} is set by the server", "chat_template_kwargs")
        return {
            **self.special_tokens,
            **template_kwargs,
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }

    def _render(self, variables: dict) -> str:
        try:
            return self.template.render(**variables)
        except RENDER_ERRORS as exc:
            raise RequestError(f"the chat template refused the messages: {exc}", "messages") from exc

    def _render_continuation(self, variables: dict) -> str:
        """Render with a marker after the final message's content and cut there, as transformers does."""
        final = variables["messages"][-1]
        if not isinstance(final.get("content"), str):
            raise RequestError("continue_final_message: the final message has no content to continue", "messages")
        if "content" not in self.text:
            raise RequestError("continue_final_message: the chat template does not render message content", "messages")
        content = final["content"]
        final["content"] = content + CONTINUE_TAG
        rendered = self._render(variables)
        marker = CONTINUE_TAG.strip()
        if content.strip() not in rendered or marker not in rendered:
            raise RequestError("continue_final_message: the chat template drops part of the final message", "messages")
        cut = rendered.rindex(marker)
        # A template that trims the content also trimmed its trailing spaces, so trim what is kept too.
        return rendered[:cut] if rendered.startswith(CONTINUE_TAG, cut) else rendered[:cut].rstrip()


def load_chat_template(model_config: ModelConfig) -> ChatTemplate:
    """The --chat-template file, else the tokenizer directory's template, else the shipped fallback."""
    directory = _tokenizer_dir(model_config)
    special_tokens = _special_tokens(directory) if directory else dict(BUILTIN_SPECIAL_TOKENS)
    if model_config.chat_template is not None:
        return ChatTemplate(_read_text(model_config.chat_template), model_config.chat_template, special_tokens)
    found = _find_template(directory) if directory else None
    if found is None:
        return ChatTemplate(_read_text(FALLBACK_PATH), "fallback", special_tokens)
    return ChatTemplate(found[0], found[1], special_tokens)


def _tokenizer_dir(model_config: ModelConfig) -> Optional[str]:
    path = model_config.tokenizer_path or model_config.model_path
    if path is None or path == BUILTIN:
        return None
    # A tokenizer.json named directly: its chat template and config sit beside it.
    return path if os.path.isdir(path) else os.path.dirname(path)


def _find_template(directory: str) -> Optional[tuple[str, str]]:
    """(template text, source) from the files transformers reads, in its order of priority."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        return _read_text(jinja_path), jinja_path
    named_dir = os.path.join(directory, "additional_chat_templates")
    if os.path.isdir(named_dir) and os.listdir(named_dir):
        raise ConfigError(f"{named_dir}: named chat templates, but no chat_template.jinja; pass --chat-template FILE")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        value = _read_json(path).get("chat_template") if os.path.isfile(path) else None
        if value is not None:
            return _default_template(value, path), path
    return None


def _default_template(value: Any, path: str) -> str:
    """The template itself, or the one named "default" of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        names = sorted(map(str, named))
        raise ConfigError(f"{path}: chat_template has templates {names} but none named 'default'; use --chat-template")
    raise ConfigError(
        f"{path}: chat_template must be a string or a list of named templates, not {type(value).__name__}"
    )


def _special_tokens(directory: str) -> dict[str, str]:
    """Special-token strings from tokenizer_config.json, filled in from the legacy special_tokens_map.json."""
    tokens: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        config = _read_json(path) if os.path.isfile(path) else {}
        for key in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(key))
            if text is not None:
                tokens[key] = text
    return tokens


def _token_text(value: Any) -> Optional[str]:
    """A special token's string, whether saved plain or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from exc


def _read_json(path: str) -> dict:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _prepare_messages(messages: list[dict]) -> list[dict]:
    """Fresh copies shaped as transformers hands them to the template, with text parts joined."""
    if not messages:
        raise RequestError("messages: must contain at least one message", "messages")
    return [_prepare_message(index, message) for index, message in enumerate(messages)]


def _prepare_message(index: int, message: dict) -> dict:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{index}]: must be an object, got {type(message).__name__}", "messages")
    # transformers drops None values, since templates test keys with `is defined`, not for None.
    message = {key: value for key, value in message.items() if value is not None}
    if isinstance(message.get("content"), list):
        message["content"] = _join_text_parts(index, message["content"])
    reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [_call_for_template(call) for call in message["tool_calls"]]
    return message


def _call_for_template(call: Any) -> Any:
    """An OpenAI tool call with its arguments' JSON text as the object templates expect (as vLLM hands them)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _join_text_parts(index: int, parts: list) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"messages[{index}].content: only text parts are supported, got {kind!r}", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


class _GenerationBlock(Extension):
    """Accepts transformers' `{% generation %}` tag (assistant-token masks) and renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateNamespace(Namespace):
    """jinja's namespace() without underscore names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # jinja's own signature trick: `self` stays positional-only so namespace(self=...) still works.
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


class _TemplateDict:
    """dict() for templates, as a plain callable so templates cannot reach the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names on a namespace: {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Unlike jinja's own tojson: no HTML escaping, non-ASCII kept, and json.dumps' layout options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    """A sandbox set up like transformers': templates are untrusted code from the checkpoint."""
    extensions = [_GenerationBlock, loopcontrols]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    return env
