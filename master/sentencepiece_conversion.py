"""A sentencepiece `tokenizer.model` as a `tokenizers.Tokenizer`: converted once by transformers, then cached.

The conversion is transformers' own (its fast tokenizer built from the slow one, honouring
tokenizer_config.json: add_bos_token, add_eos_token, legacy, added tokens), so the ids are the ones
transformers gives. It runs in a child process (`python -m llmserve.master.sentencepiece_conversion`),
because importing transformers may import torch, which the master never holds. The result is cached
under the user's cache directory, keyed by the bytes of the files it was made from; the checkpoint's
directory is only read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

from tokenizers import Tokenizer

from llmserve.common.errors import ConfigError

logger = logging.getLogger("llmserve.master")

CONVERSION_VERSION = 1  # part of the cache key: bump when the conversion changes
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")  # what transformers reads
IGNORED_CONFIG_KEYS = ("chat_template",)  # no part of the tokenizer: editing it does not convert again
LLAMA_CLASSES = (None, "LlamaTokenizer", "LlamaTokenizerFast")
CONVERSION_TIMEOUT = 600.0
PIP_HINT = "pip install 'transformers>=4.45' 'sentencepiece>=0.2.0' 'protobuf>=4.25'"


def converted_tokenizer(model_file: str) -> Tokenizer:
    """The tokenizer of a sentencepiece model file and the transformers config files beside it."""
    inputs = _conversion_inputs(model_file)
    cached = os.path.join(cache_dir(), "tokenizers", _digest(inputs), "tokenizer.json")
    if not os.path.isfile(cached):
        try:
            _convert(model_file, inputs, cached)
        except OSError as exc:  # an unwritable cache: convert at every start instead
            logger.warning("cannot cache the converted tokenizer at %s (%s); converting without a cache", cached, exc)
            with tempfile.TemporaryDirectory() as scratch:
                target = os.path.join(scratch, "tokenizer.json")
                _convert(model_file, inputs, target)
                return Tokenizer.from_file(target)
    return Tokenizer.from_file(cached)


def cache_dir() -> str:
    """llmserve's folder of the user's cache: $XDG_CACHE_HOME/llmserve, else ~/.cache/llmserve."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmserve")


def _conversion_inputs(model_file: str) -> dict[str, bytes]:
    """File name -> bytes of what the conversion reads, as the child process will find them."""
    inputs = {"tokenizer.model": _read_bytes(model_file)}
    folder = os.path.dirname(os.path.abspath(model_file))
    for name in CONFIG_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            inputs[name] = _read_bytes(path)
    if "tokenizer_config.json" in inputs:
        inputs["tokenizer_config.json"] = _relevant_config(inputs["tokenizer_config.json"], folder)
    return inputs


def _relevant_config(data: bytes, folder: str) -> bytes:
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{os.path.join(folder, 'tokenizer_config.json')}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{os.path.join(folder, 'tokenizer_config.json')}: expected a JSON object")
    relevant = {key: value for key, value in config.items() if key not in IGNORED_CONFIG_KEYS}
    return json.dumps(relevant, sort_keys=True).encode()


def _digest(inputs: dict[str, bytes]) -> str:
    digest = hashlib.sha256(f"llmserve tokenizer conversion {CONVERSION_VERSION}".encode())
    for name in sorted(inputs):
        digest.update(f"\0{name}\0{len(inputs[name])}\0".encode())
        digest.update(inputs[name])
    return digest.hexdigest()


def _convert(model_file: str, inputs: dict[str, bytes], target: str) -> None:
    """Convert in a child process and move the result to `target` atomically."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".converting-") as staging:
        for name, data in inputs.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
        output = os.path.join(staging, "tokenizer.json")
        _run_converter(model_file, staging, output)
        os.replace(output, target)
    logger.info("converted %s to %s in %.1f s (later starts read it)", model_file, target, time.perf_counter() - start)


def _run_converter(model_file: str, staging: str, output: str) -> None:
    command = [sys.executable, "-m", "llmserve.master.sentencepiece_conversion", staging, output]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=CONVERSION_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"{model_file}: converting the sentencepiece tokenizer took over {CONVERSION_TIMEOUT:.0f} s"
        ) from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        hint = f"; install what it needs: {PIP_HINT}" if "ModuleNotFoundError" in lines[-1] else ""
        raise ConfigError(f"{model_file}: cannot convert the sentencepiece tokenizer: {lines[-1]}{hint}")


def main(staging: str, output: str) -> None:
    """In the child process: load the staged files with transformers and save its fast tokenizer's tokenizer.json."""
    config_path = os.path.join(staging, "tokenizer_config.json")
    config = json.loads(_read_bytes(config_path)) if os.path.isfile(config_path) else {}
    if config.get("tokenizer_class") in LLAMA_CLASSES:  # Llama's directly: AutoTokenizer imports torch (~1 s more)
        from transformers import LlamaTokenizerFast as tokenizer_class
    else:
        from transformers import AutoTokenizer as tokenizer_class
    tokenizer = tokenizer_class.from_pretrained(staging, local_files_only=True)
    tokenizer.backend_tokenizer.save(output)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from exc


if __name__ == "__main__":
    main(*sys.argv[1:3])
