"""A checkpoint that ships only a sentencepiece tokenizer.model is served (its tokenizer converted into the user's
cache, not into the checkpoint); a tokenizer that cannot serve the model stops `llmserve serve` with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.e2e.server import TINY_LLAMA, running_server, save_tiny_llama, stream_tokens, write_config
from tests.sentencepiece_tokenizer import save_sentencepiece_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

PROMPT = "I love Beijing, because"


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "llama-2-like"
    path.mkdir()
    save_tiny_llama(path)
    os.remove(path / "tokenizer.json")  # the builtin one save_tiny_llama writes
    save_sentencepiece_model(path)
    return path


def test_a_checkpoint_with_only_tokenizer_model_answers_with_text(checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # the server inherits it
    files = sorted(os.listdir(checkpoint))
    with running_server(write_config(tmp_path, {"model_path": str(checkpoint)})) as server:
        ids, final = stream_tokens(server.url, PROMPT, max_new_tokens=8, ignore_eos=True)
    reference = transformers.LlamaTokenizerFast.from_pretrained(str(checkpoint))
    assert final["details"]["prompt_tokens"] == len(reference(PROMPT)["input_ids"])
    assert final["generated_text"] and final["generated_text"] == reference.decode(ids, skip_special_tokens=True)
    assert sorted(os.listdir(checkpoint)) == files
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["tokenizer.json"]


def test_the_builtin_tokenizer_for_a_32000_token_model_stops_start_up(tmp_path):
    config = write_config(tmp_path, {"load_format": "dummy", "dummy_config": {**TINY_LLAMA, "vocab_size": 32000}})
    done = subprocess.run(
        [sys.executable, "-m", "llmserve", "serve", "--config", config],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "the tokenizer (builtin, 1024 token ids) and the model's vocab_size 32000" in done.stderr
