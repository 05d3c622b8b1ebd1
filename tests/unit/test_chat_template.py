"""Chat templates render exactly as transformers' apply_chat_template, from the files transformers saves."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from llmserve.common.config import ModelConfig  # noqa: E402
from llmserve.common.errors import ConfigError, RequestError  # noqa: E402
from llmserve.master import tokenizer as master_tokenizer  # noqa: E402
from llmserve.master.chat_template import BUILTIN_SPECIAL_TOKENS, ChatTemplate, load_chat_template  # noqa: E402

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Indented blocks, as Hub templates are written: trim_blocks and lstrip_blocks drop the layout.
LLAMA2 = """\
{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{- ' ' + content | trim + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""

# tojson with and without options, on non-ASCII and HTML-like text; tool_calls; a template kwarg.
TOOLS = """\
{% set ns = namespace(calls=0) %}
{% for message in messages %}
<|{{ message.role }}|>
{% if message.content is defined %}{{ message.content }}{% endif %}
{% if message.tool_calls is defined %}
{% for call in message.tool_calls %}
{% set ns.calls = ns.calls + 1 %}
<tool_call>{{ call.function | tojson }}</tool_call>
<args>{{ call.function.arguments | tojson(indent=2, sort_keys=true) }}</args>
{% endfor %}
{% endif %}
{% endfor %}
<meta>{{ dict(calls=ns.calls, tools=tools) | tojson(separators=(',', ':')) }}</meta>
{% if add_generation_prompt %}
<|assistant|>
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>
{% endif %}
{% endif %}
"""

# Loop controls, strftime_now, and transformers' {% generation %} tag.
CONTROLS = """\
{{- bos_token }}Year {{ strftime_now('%Y') }}.
{% for message in messages %}
{% if message.role == 'system' %}{% continue %}{% endif %}
{% if loop.index > 6 %}{% break %}{% endif %}
{% if message.role == 'assistant' %}
A: {% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}

{% else %}
Q: {{ message.content }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}A:{% endif %}
"""

TEMPLATES = {"llama3": LLAMA3, "qwen2": QWEN2, "llama2": LLAMA2, "tools": TOOLS, "controls": CONTROLS}

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "  Paris. <b>Café</b> \u00e9t\u00e9  "},
    {"role": "user", "content": "And of Italy?\n"},
]


@pytest.fixture(scope="module")
def backend():
    """A transformers fast tokenizer built from our builtin tokenizer."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=master_tokenizer.build_builtin_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )


def save_with_transformers(backend, directory: Path, chat_template) -> object:
    """Save the tokenizer with this template as transformers does, and load it back as a user would."""
    backend.chat_template = chat_template
    backend.save_pretrained(str(directory))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def checkpoint(directory: Path, chat_template: str | None = None) -> ModelConfig:
    return ModelConfig(model_path=str(directory), chat_template=chat_template)


def expected(reference, messages: list[dict], **kwargs) -> str:
    return reference.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["prompt", "no_prompt"])
@pytest.mark.parametrize("with_system", [True, False], ids=["system", "no_system"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_renders_like_transformers_for_realistic_templates(backend, tmp_path, name, with_system, add_generation_prompt):
    reference = save_with_transformers(backend, tmp_path, TEMPLATES[name])
    messages = [SYSTEM, *TURNS] if with_system else TURNS
    template = load_chat_template(checkpoint(tmp_path))
    assert template.source == str(tmp_path / "chat_template.jinja")
    rendered = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected(reference, messages, add_generation_prompt=add_generation_prompt)


def test_tool_calls_and_none_content_render_like_transformers(backend, tmp_path):
    reference = save_with_transformers(backend, tmp_path, TOOLS)
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich", "unit": "c"}}}
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    rendered = load_chat_template(checkpoint(tmp_path)).render(messages)
    assert rendered == expected(reference, messages, add_generation_prompt=True)
    assert '"Zürich"' in rendered and "None" not in rendered


def test_tools_render_like_transformers_and_openai_arguments_text_becomes_an_object(backend, tmp_path):
    reference = save_with_transformers(backend, tmp_path, TOOLS)
    tools = [{"type": "function", "function": {"name": "weather", "description": "Today's weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    as_sent = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    as_object = {**as_sent, "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [as_sent]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    rendered = load_chat_template(checkpoint(tmp_path)).render(messages, tools=tools)
    reference_messages = [messages[0], {"role": "assistant", "tool_calls": [as_object]}, messages[2]]
    assert rendered == expected(reference, reference_messages, add_generation_prompt=True, tools=tools)
    assert '"description":"Today\'s weather"' in rendered and '"city": "Oslo"' in rendered
    assert '"tools":null' in load_chat_template(checkpoint(tmp_path)).render(messages[:1])


def test_template_kwargs_reach_the_template_like_transformers(backend, tmp_path):
    reference = save_with_transformers(backend, tmp_path, TOOLS)
    template = load_chat_template(checkpoint(tmp_path))
    rendered = template.render(TURNS, template_kwargs={"enable_thinking": False})
    assert rendered == expected(reference, TURNS, add_generation_prompt=True, enable_thinking=False)
    assert rendered.endswith("<think>\n\n</think>\n")


def test_template_kwargs_may_not_replace_the_messages(backend, tmp_path):
    save_with_transformers(backend, tmp_path, QWEN2)
    with pytest.raises(RequestError, match="'messages' is set by the server"):
        load_chat_template(checkpoint(tmp_path)).render(TURNS, template_kwargs={"messages": []})


@pytest.mark.parametrize("name", ["llama3", "qwen2", "llama2", "tools"])
def test_continue_final_message_matches_transformers(backend, tmp_path, name):
    reference = save_with_transformers(backend, tmp_path, TEMPLATES[name])
    messages = [*TURNS, {"role": "assistant", "content": "Rome, of course "}]
    rendered = load_chat_template(checkpoint(tmp_path)).render(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == expected(reference, messages, continue_final_message=True)
    assert rendered.rstrip().endswith("Rome, of course")


def test_continue_final_message_with_generation_prompt_is_a_request_error(backend, tmp_path):
    save_with_transformers(backend, tmp_path, QWEN2)
    with pytest.raises(RequestError, match="cannot both be set"):
        load_chat_template(checkpoint(tmp_path)).render(TURNS, add_generation_prompt=True, continue_final_message=True)


def test_raise_exception_is_a_request_error_with_the_templates_message(backend, tmp_path):
    save_with_transformers(backend, tmp_path, LLAMA2)
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    with pytest.raises(RequestError, match="chat template refused the messages: Conversation roles must alternate"):
        load_chat_template(checkpoint(tmp_path)).render(messages)


def test_text_parts_render_like_the_joined_string(backend, tmp_path):
    save_with_transformers(backend, tmp_path, QWEN2)
    template = load_chat_template(checkpoint(tmp_path))
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    as_parts = template.render([{"role": "user", "content": parts}])
    assert as_parts == template.render([{"role": "user", "content": "What is the capital\nof France?"}])


def test_a_non_text_part_is_a_request_error_naming_the_message(backend, tmp_path):
    save_with_transformers(backend, tmp_path, QWEN2)
    image = {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}
    messages = [*TURNS, {"role": "assistant", "content": "Rome."}, {"role": "user", "content": [image]}]
    with pytest.raises(RequestError, match=r"messages\[4\].content: only text parts are supported, got 'image_url'"):
        load_chat_template(checkpoint(tmp_path)).render(messages)


def test_an_empty_conversation_is_a_request_error(backend, tmp_path):
    save_with_transformers(backend, tmp_path, QWEN2)
    with pytest.raises(RequestError, match="at least one message"):
        load_chat_template(checkpoint(tmp_path)).render([])


def test_reads_the_chat_template_key_of_a_handwritten_tokenizer_config(tmp_path):
    bos = {"content": "<|begin_of_text|>", "lstrip": False}  # the AddedToken form older checkpoints save
    config = {"chat_template": LLAMA3 + "{{ eos_token }}", "bos_token": bos}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|end|>"}))
    template = load_chat_template(checkpoint(tmp_path))
    assert template.source == str(tmp_path / "tokenizer_config.json")
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|end|>"
    )


def test_uses_the_default_of_named_templates_in_tokenizer_config(tmp_path):
    named = [{"name": "tool_use", "template": "tools!"}, {"name": "default", "template": "{{ messages[0].content }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(checkpoint(tmp_path)).render([{"role": "user", "content": "Hi"}]) == "Hi"


def test_named_templates_without_a_default_are_a_config_error_naming_the_file(tmp_path):
    named = [{"name": "tool_use", "template": "tools!"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json.*\['tool_use'\].*'default'"):
        load_chat_template(checkpoint(tmp_path))


def test_renders_the_default_of_named_templates_saved_by_transformers(backend, tmp_path):
    reference = save_with_transformers(backend, tmp_path, {"default": QWEN2, "tool_use": LLAMA3})
    rendered = load_chat_template(checkpoint(tmp_path)).render(TURNS)
    assert rendered == expected(reference, TURNS, add_generation_prompt=True)


def test_chat_template_jinja_wins_over_json_files(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("jinja")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}))
    assert load_chat_template(checkpoint(tmp_path)).render(TURNS) == "jinja"
    os.remove(tmp_path / "chat_template.jinja")
    assert load_chat_template(checkpoint(tmp_path)).render(TURNS) == "json"


def test_chat_template_file_in_the_config_overrides_the_checkpoint(backend, tmp_path):
    save_with_transformers(backend, tmp_path / "model", QWEN2)
    override = tmp_path / "mine.jinja"
    override.write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}|{% endfor %}")
    template = load_chat_template(checkpoint(tmp_path / "model", chat_template=str(override)))
    assert template.source == str(override)
    assert template.render(TURNS[:1]) == "<s>What is the capital of France?|"


def test_tokenizer_path_is_searched_before_model_path(backend, tmp_path):
    save_with_transformers(backend, tmp_path / "tokenizer", LLAMA3)
    config = ModelConfig(model_path=str(tmp_path), tokenizer_path=str(tmp_path / "tokenizer"))
    assert load_chat_template(config).source == str(tmp_path / "tokenizer" / "chat_template.jinja")


def test_a_tokenizer_json_path_finds_the_template_beside_it(backend, tmp_path):
    save_with_transformers(backend, tmp_path, QWEN2)
    config = ModelConfig(load_format="dummy", dummy_config={}, tokenizer_path=str(tmp_path / "tokenizer.json"))
    assert load_chat_template(config).source == str(tmp_path / "chat_template.jinja")


def test_fallback_renders_roles_as_paragraphs_when_the_checkpoint_has_no_template(backend, tmp_path):
    save_with_transformers(backend, tmp_path, None)
    template = load_chat_template(checkpoint(tmp_path))
    assert template.source == "fallback"
    assert template.render([SYSTEM, TURNS[0]]) == (
        "<s>system: You are terse. Answer in one line.\n\nuser: What is the capital of France?\n\nassistant:"
    )
    assert template.render(TURNS[:2], add_generation_prompt=False) == (
        "<s>user: What is the capital of France?\n\nassistant:   Paris. <b>Café</b> été  "
    )


def test_fallback_with_the_builtin_tokenizer_uses_its_special_tokens():
    config = ModelConfig(load_format="dummy", dummy_config={"num_layers": 1}, tokenizer_path="builtin")
    template = load_chat_template(config)
    assert template.source == "fallback"
    assert template.render([{"role": "user", "content": "Hi"}]) == "<s>user: Hi\n\nassistant:"


def test_fallback_continues_the_final_message_like_transformers(backend, tmp_path):
    fallback = load_chat_template(ModelConfig(load_format="dummy", dummy_config={}, tokenizer_path="builtin"))
    reference = save_with_transformers(backend, tmp_path, fallback.text)
    messages = [TURNS[0], {"role": "assistant", "content": "It is"}]
    rendered = fallback.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered == expected(reference, messages, continue_final_message=True)
    assert rendered.endswith("assistant: It is")


def test_builtin_special_tokens_match_the_builtin_tokenizer():
    builtin = master_tokenizer.build_builtin_tokenizer()
    for text in BUILTIN_SPECIAL_TOKENS.values():
        assert text in master_tokenizer.BUILTIN_SPECIAL_TOKENS and builtin.token_to_id(text) is not None


def test_a_template_that_does_not_compile_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content }}")
    with pytest.raises(ConfigError, match="chat_template.jinja: does not compile"):
        load_chat_template(checkpoint(tmp_path))


def test_an_unreadable_tokenizer_config_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json: not valid JSON"):
        load_chat_template(checkpoint(tmp_path))


def test_templates_cannot_reach_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", "test", {})
    with pytest.raises(RequestError, match="chat template refused"):
        template.render(TURNS)
