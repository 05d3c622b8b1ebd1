"""Which tokenizer a config names (tokenizer_path, else the checkpoint's, else builtin), and checkpoints that
ship only a sentencepiece tokenizer.model: converted once, as transformers converts it, cached outside them."""
from __future__ import annotations

import os

import pytest

from llmserve.common.config import ModelConfig, load_config
from llmserve.common.errors import ConfigError
from llmserve.master import sentencepiece_conversion
from llmserve.master.tokenizer import BUILTIN, build_builtin_tokenizer, decode, encode, load_tokenizer, tokenizer_file
from tests.conftest import ROOT
from tests.sentencepiece_tokenizer import save_sentencepiece_model

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

TEXTS = [
    "Hello world", "I love Beijing, because", "naïve café, 北京 🙂", "two  spaces\nnew line\ttab",
    "in 2024: 31.5%",
]


def files_of(directory) -> dict[str, tuple[int, int]]:
    """Every file under `directory` -> (size, mtime), to see that nothing was written there."""
    found = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def cached_files(cache) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Llama 2-like tokenizer: only tokenizer.model and tokenizer_config.json."""
    path = tmp_path_factory.mktemp("sentencepiece-only")
    save_sentencepiece_model(path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint, cache):
    """The tokenizer loaded (converted) once, and the checkpoint's files before that."""
    before = files_of(checkpoint)
    return load_tokenizer(ModelConfig(model_path=str(checkpoint))), before


def test_a_sentencepiece_only_checkpoint_encodes_as_transformers_and_sentencepiece(checkpoint, converted):
    tokenizer, _ = converted
    reference = transformers.LlamaTokenizerFast.from_pretrained(str(checkpoint))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    for text in TEXTS:
        ids = encode(tokenizer, text)
        assert ids == reference(text)["input_ids"] == [1, *processor.encode(text)]
        assert decode(tokenizer, ids) == reference.decode(ids, skip_special_tokens=True) == processor.decode(ids[1:])
    with_special = "<s>Hello</s> world"
    assert encode(tokenizer, with_special, add_special_tokens=False) == reference.encode(
        with_special, add_special_tokens=False
    )


def test_the_conversion_is_cached_in_the_users_cache_and_the_checkpoint_is_left_alone(
    checkpoint, cache, converted, monkeypatch
):
    tokenizer, before = converted
    (entry,) = cached_files(cache)
    assert entry.startswith("llmserve/tokenizers/") and entry.endswith("/tokenizer.json")
    assert files_of(checkpoint) == before

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(sentencepiece_conversion, "_convert", no_conversion)
    again = load_tokenizer(ModelConfig(model_path=str(checkpoint)))
    assert again.to_str() == tokenizer.to_str()
    assert cached_files(cache) == [entry]


def test_the_checkpoints_tokenizer_config_is_honoured(tmp_path, cache):
    save_sentencepiece_model(tmp_path, add_bos_token=False, add_eos_token=True)
    tokenizer = load_tokenizer(ModelConfig(tokenizer_path=str(tmp_path / "tokenizer.model")))
    reference = transformers.LlamaTokenizerFast.from_pretrained(str(tmp_path))
    assert encode(tokenizer, "Hello world") == reference("Hello world")["input_ids"]
    assert encode(tokenizer, "Hello world")[-1] == 2 and encode(tokenizer, "Hello world")[0] != 1


def test_an_unwritable_cache_means_converting_at_every_start_with_a_warning(checkpoint, tmp_path, monkeypatch, caplog):
    (tmp_path / "not-a-directory").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-directory"))
    tokenizer = load_tokenizer(ModelConfig(model_path=str(checkpoint)))
    assert encode(tokenizer, "Hello world") == transformers.LlamaTokenizerFast.from_pretrained(str(checkpoint)).encode(
        "Hello world"
    )
    assert "cannot cache the converted tokenizer" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["not-a-directory"]


def test_a_file_that_is_no_sentencepiece_model_is_a_start_up_error(tmp_path, cache):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"tokenizer\.model: cannot convert the sentencepiece tokenizer"):
        load_tokenizer(ModelConfig(model_path=str(tmp_path)))
    assert os.listdir(tmp_path) == ["tokenizer.model"]
    assert not [name for name in cached_files(cache) if ".converting-" in name]  # nothing half-made is left


# Precedence: tokenizer_path if set, else the checkpoint's tokenizer, else builtin.


@pytest.fixture
def both_files(tmp_path):
    build_builtin_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.model").write_bytes(b"")
    return tmp_path


def test_a_dummy_model_without_model_path_gets_the_builtin_tokenizer():
    assert tokenizer_file(ModelConfig(load_format="dummy", dummy_config={})) == BUILTIN


def test_a_checkpoints_tokenizer_json_comes_before_its_tokenizer_model(both_files):
    assert tokenizer_file(ModelConfig(model_path=str(both_files))) == str(both_files / "tokenizer.json")
    os.remove(both_files / "tokenizer.json")
    assert tokenizer_file(ModelConfig(model_path=str(both_files))) == str(both_files / "tokenizer.model")


@pytest.mark.parametrize("named", ["builtin", "directory", "file"])
def test_tokenizer_path_comes_before_the_checkpoints_tokenizer(both_files, tmp_path_factory, named):
    other = tmp_path_factory.mktemp("other")
    build_builtin_tokenizer().save(str(other / "tokenizer.json"))
    path = {"builtin": "builtin", "directory": str(other), "file": str(other / "tokenizer.json")}[named]
    expected = "builtin" if named == "builtin" else str(other / "tokenizer.json")
    assert tokenizer_file(ModelConfig(model_path=str(both_files), tokenizer_path=path)) == expected


def test_the_default_config_with_a_model_path_uses_the_checkpoints_tokenizer_and_end_tokens(both_files):
    default = os.path.join(ROOT, "configs", "default.yaml")
    with pytest.raises(ConfigError, match="dummy_config: the checkpoint in model_path brings its own config.json"):
        load_config(default, {"model_config": {"model_path": str(both_files)}})
    config = load_config(default, {"model_config": {"model_path": str(both_files), "dummy_config": None}})
    assert tokenizer_file(config.model_config) == str(both_files / "tokenizer.json")
    assert config.model_config.end_token_id is None
    assert tokenizer_file(load_config(default).model_config) == BUILTIN


def test_a_checkpoint_without_a_tokenizer_is_a_start_up_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"model_config\.model_path: .* neither tokenizer\.json nor tokenizer\.model"):
        tokenizer_file(ModelConfig(model_path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"model_config\.tokenizer_path: .*missing does not exist"):
        tokenizer_file(ModelConfig(model_path=str(tmp_path), tokenizer_path=str(tmp_path / "missing")))
