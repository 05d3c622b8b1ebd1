"""Config loading: defaults, the embedded default file, and errors that name key and file."""
from __future__ import annotations

import os

import pytest

from llmserve.common.config import load_config
from llmserve.common.errors import ConfigError
from llmserve.common.model_info import model_info, read_hf_config
from tests.conftest import ROOT

DEFAULT_YAML = os.path.join(ROOT, "configs", "default.yaml")
BENCH_YAML = os.path.join(ROOT, "configs", "bench.yaml")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_default_config_loads():
    config = load_config(DEFAULT_YAML)
    assert config.model_config.load_format == "dummy"
    assert config.serving_config.server_port == 8835
    assert config.pa_config.block_size == 16
    # The dummy model's own eos and the builtin tokenizer, so a copy with model_path set takes the checkpoint's.
    assert config.model_config.end_token_id is None and config.model_config.tokenizer_path is None
    assert model_info(config.model_config, read_hf_config(config.model_config)).eos_token_ids == (2,)


def test_bench_config_loads():
    config = load_config(BENCH_YAML)
    assert config.model_config.dummy_config["num_hidden_layers"] == 12
    assert config.model_config.end_token_id == [2]


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("serving_config:\n  agent_ports: 9000\n", "serving_config", ("agent_ports", [9000])),
        ("model_config:\n  load_format: dummy\n  dummy_config: {}\n  end_token_id: 7\n", "model_config", ("end_token_id", [7])),
    ],
)
def test_a_single_value_for_a_list_key_becomes_a_one_element_list(tmp_path, text, key, expected):
    config = load_config(write(tmp_path, text))
    name, value = expected
    assert getattr(getattr(config, key), name) == value


def test_a_mapping_for_a_list_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml.*serving_config\.agent_ports.*must be a list"):
        load_config(write(tmp_path, "serving_config:\n  agent_ports: {a: 1}\n"))


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "pa_config:\n  num_blokcs: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*pa_config\.num_blokcs"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'pa_confg'"):
        load_config(write(tmp_path, "pa_confg: {}\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("pa_config:\n  num_blocks: many\n", "pa_config.num_blocks"),
        ("scheduler_config:\n  batching_strategy: greedy\n", "scheduler_config.batching_strategy"),
        ("model_config:\n  model_dtype: float64\n  load_format: dummy\n  dummy_config: {}\n", "model_config.model_dtype"),
        ("serving_config:\n  launch_agents: 1\n", "serving_config.launch_agents"),
        ("scheduler_config:\n  decode_batch_size: 0\n", "scheduler_config.decode_batch_size"),
        ("serving_config:\n  log_level: LOUD\n", "serving_config.log_level"),
        ("serving_config:\n  step_timeout: 0\n", "serving_config.step_timeout"),
        ("serving_config:\n  agent_start_timeout: -1.5\n", "serving_config.agent_start_timeout"),
        ("serving_config:\n  num_threads: 0\n", "serving_config.num_threads"),
        ("serving_config:\n  server_port: 9000\n  agent_ports: 9000\n", "serving_config.server_port"),
        ("serving_config:\n  agent_ports: [70000]\n", "serving_config.agent_ports"),
        ("serving_config:\n  agent_ports: [true]\n", "serving_config.agent_ports"),
        ("model_config:\n  load_format: dummy\n  dummy_config: {}\n  end_token_id: [2, -1]\n", "model_config.end_token_id"),
        ("model_config:\n  load_format: dummy\n  dummy_config: {}\n  end_token_id: [eos]\n", "model_config.end_token_id"),
        ("scheduler_config:\n  decode_batch_size: 64\n  max_num_batched_tokens: 32\n", "scheduler_config.max_num_batched_tokens"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert key in str(info.value) and "c.yaml" in str(info.value)


@pytest.mark.parametrize("level", ["debug", "Warning", "CRITICAL"])
def test_log_level_accepts_the_logging_names_in_any_case(tmp_path, level):
    config = load_config(write(tmp_path, f"serving_config:\n  log_level: {level}\n"))
    assert config.serving_config.log_level == level


def test_missing_model_path_is_an_error(tmp_path):
    path = write(tmp_path, "model_config:\n  model_path: /nonexistent/model\n")
    with pytest.raises(ConfigError, match="model_config.model_path"):
        load_config(path)


def test_missing_file_and_bad_yaml_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "pa_config: [unclosed\n"))


def test_overrides_merge_into_sections():
    config = load_config(DEFAULT_YAML, {"serving_config": {"server_port": 9999}})
    assert config.serving_config.server_port == 9999
    assert config.serving_config.agent_ports == [8836]


def test_every_config_key_is_in_the_readme_configuration_reference():
    import dataclasses
    import os
    import re

    from llmserve.common.config import SECTIONS

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
        readme = f.read()
    start = readme.index("## Configuration reference")
    reference = readme[start : readme.index("\n## ", start + 1)]
    missing = [f"{section}.{field.name}" for section, cls in SECTIONS.items() for field in dataclasses.fields(cls)
               if not re.search(rf"[`.]{field.name}`", reference)]
    assert not missing, f"README's configuration reference lacks {missing}"
