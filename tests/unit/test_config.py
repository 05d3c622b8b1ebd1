"""Config loading: defaults, the embedded default file, and errors that name key and file."""
from __future__ import annotations

import os

import pytest

from common.config import load_config
from common.errors import ConfigError
from tests.conftest import ROOT

DEFAULT_YAML = os.path.join(ROOT, "configs", "default.yaml")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_default_config_loads():
    config = load_config(DEFAULT_YAML)
    assert config.model_config.load_format == "dummy"
    assert config.serving_config.server_port == 8835
    assert config.pa_config.block_size == 16
    assert config.model_config.end_token_id == [2]


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
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert key in str(info.value) and "c.yaml" in str(info.value)


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
