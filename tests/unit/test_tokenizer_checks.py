"""Start-up checks of the tokenizer against the model: errors and warnings that name both sides."""
from __future__ import annotations

import json

import pytest

from llmserve.common.config import ModelConfig
from llmserve.common.errors import ConfigError
from llmserve.common.model_info import model_info, read_hf_config
from llmserve.master.tokenizer import build_builtin_tokenizer
from llmserve.master.tokenizer_checks import check_tokenizer

BUILTIN = build_builtin_tokenizer()  # 1024 ids; 0, 1, 2 are <unk>, <s>, </s>


def check(tokenizer=BUILTIN, vocab_size: int = 1024, eos=2, **model_config) -> list[str]:
    config = ModelConfig(
        load_format="dummy", dummy_config={"vocab_size": vocab_size, "eos_token_id": eos}, **model_config
    )
    hf_config = read_hf_config(config)
    return check_tokenizer(tokenizer, config, hf_config, model_info(config, hf_config))


def test_a_tokenizer_that_fits_the_model_passes_quietly():
    assert check() == []


def test_the_builtin_tokenizer_for_a_32000_token_model_is_an_error_naming_both():
    with pytest.raises(ConfigError) as error:
        check(vocab_size=32000)
    assert "(builtin, 1024 token ids)" in str(error.value)
    assert "vocab_size 32000 (model_config.dummy_config)" in str(error.value)
    assert "model_config.tokenizer_path" in str(error.value)


def test_a_much_smaller_tokenizer_named_explicitly_is_a_loud_warning():
    (warning,) = check(vocab_size=32000, tokenizer_path="builtin")
    assert warning.startswith("model_config.tokenizer_path:")
    assert "(builtin, 1024 token ids)" in warning and "vocab_size 32000" in warning


@pytest.mark.parametrize("explicit", [None, "builtin"])
def test_a_tokenizer_larger_than_the_model_is_an_error_even_when_named(explicit):
    with pytest.raises(ConfigError, match=r"1024 token ids.*vocab_size 1000.*no embedding for ids 1000\.\.1023"):
        check(vocab_size=1000, tokenizer_path=explicit)


@pytest.mark.parametrize(
    "num_ids, vocab_size",
    [(1000, 1024), (1024, 1030), (32000, 32064), (151665, 151936)],  # padded to a multiple of 128, or under 1%
)
def test_a_model_padding_its_embedding_past_the_tokenizer_is_normal(num_ids, vocab_size):
    tokenizer = BUILTIN if num_ids == 1024 else FakeTokenizer(num_ids)
    assert check(tokenizer, vocab_size=vocab_size) == []


def test_more_than_padding_is_a_warning_and_a_tenth_of_the_model_or_more_an_error():
    (warning,) = check(FakeTokenizer(100015), vocab_size=102400)  # DeepSeek LLM 7B reserves 2.3% of its ids
    assert "100015 token ids" in warning and "vocab_size 102400" in warning and "last 2385 ids" in warning
    with pytest.raises(ConfigError, match="1000 token ids.*vocab_size 1152"):
        check(FakeTokenizer(1000), vocab_size=1152)


def test_an_end_token_id_that_is_not_the_checkpoints_is_a_warning_naming_both():
    (warning,) = check(end_token_id=[5])
    assert warning.startswith("model_config.end_token_id [5 ")
    assert "[2 '</s>']" in warning and "model_config.dummy_config" in warning


def test_end_tokens_from_generation_config_count_as_the_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1024, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    config = ModelConfig(model_path=str(tmp_path), tokenizer_path="builtin", end_token_id=[7])
    hf_config = read_hf_config(config)
    assert check_tokenizer(BUILTIN, config, hf_config, model_info(config, hf_config)) == []
    config = ModelConfig(model_path=str(tmp_path), tokenizer_path="builtin", end_token_id=[9])
    (warning,) = check_tokenizer(BUILTIN, config, hf_config, model_info(config, hf_config))
    assert "[9 " in warning and "[2 '</s>', 7 " in warning and str(tmp_path / "config.json") in warning


@pytest.mark.parametrize(
    "settings, where",
    [
        ({"end_token_id": [4096]}, r"model_config\.end_token_id"),
        ({"eos": 4096}, r"eos_token_id of model_config\.dummy_config"),
    ],
)
def test_an_end_token_outside_the_tokenizer_is_an_error(settings, where):
    with pytest.raises(ConfigError, match=rf"end token id 4096 \({where}.*is not in the tokenizer \(builtin, 1024"):
        check(**settings)


class FakeTokenizer:
    """A tokenizer of `num_ids` ids, as far as the checks look."""

    def __init__(self, num_ids: int) -> None:
        self.num_ids = num_ids

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return {f"t{i}": i for i in range(self.num_ids)}

    def id_to_token(self, token_id: int):
        return f"t{token_id}" if 0 <= token_id < self.num_ids else None
