"""Facts about the served model read from its config, shared by master and agents."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from llmserve.common.config import ModelConfig
from llmserve.common.errors import ConfigError


def read_hf_config(model_config: ModelConfig) -> dict:
    """The Hugging Face config dict: the checkpoint's config.json, or the inline dummy_config."""
    if model_config.dummy_config is not None:
        return dict(model_config.dummy_config)
    path = os.path.join(model_config.model_path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"model_config.model_path: {model_config.model_path} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class ModelInfo:
    """What the master needs to know about the model (it never loads it)."""

    vocab_size: int
    max_seq_len: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: Optional[int]
    pad_token_id: Optional[int]


@dataclass(frozen=True)
class CheckpointQuantization:
    """How a pre-quantized checkpoint stores its linear layers (config.json's quantization_config)."""

    method: str  # compressed-tensors | gptq | awq: the layout on disk
    scheme: str  # int8 | int4: what agent/layers/quantization computes them with
    desc_act: bool = False  # GPTQ's act-order: g_idx names each input's group
    zero_offset: int = 0  # GPTQ's first format stores each zero point less one

    @property
    def description(self) -> str:
        return self.method + (" (act-order)" if self.desc_act else "")


QUANTIZATION_CONFIG = "config.json's quantization_config"
LOADED = "llmserve loads compressed-tensors int8 W8A8, 4-bit GPTQ and 4-bit AWQ (GEMM) checkpoints"


def checkpoint_quantization(hf_config: dict) -> Optional[CheckpointQuantization]:
    """The format a pre-quantized checkpoint is stored in, or None for a float one; ConfigError naming the
    method or field llmserve cannot load.

    Loaded: compressed-tensors `int-quantized` int8 weights, symmetric per output channel, with dynamic
    per-token int8 activations (W8A8, what llm-compressor's W8A8 recipes write); GPTQ 4-bit (symmetric or
    not, any group size or per channel, desc_act or not); AWQ 4-bit in its GEMM packing.
    """
    config = hf_config.get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    readers = {"compressed-tensors": _compressed_tensors, "gptq": _gptq, "awq": _awq}
    if method not in readers:
        raise ConfigError(f"{QUANTIZATION_CONFIG}: quant_method {method!r} is not supported; {LOADED}, or quantize "
                          "a float checkpoint itself (model_config.quantization)")
    return readers[method](config)


def _four_bits(config: dict, method: str, *keys: str) -> None:
    bits = next((config[key] for key in keys if key in config), None)
    if bits != 4:
        raise ConfigError(f"{QUANTIZATION_CONFIG}: {method} with {keys[0]} {bits!r}; {LOADED}")


def _gptq(config: dict) -> CheckpointQuantization:
    _four_bits(config, "gptq", "bits")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2") or config.get("is_marlin_format"):
        raise ConfigError(f"{QUANTIZATION_CONFIG}: GPTQ checkpoint_format {checkpoint_format!r} is not supported "
                          "(gptq and gptq_v2 are)")
    return CheckpointQuantization("gptq", "int4", bool(config.get("desc_act")), int(checkpoint_format == "gptq"))


def _awq(config: dict) -> CheckpointQuantization:
    _four_bits(config, "awq", "bits", "w_bit")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"{QUANTIZATION_CONFIG}: AWQ version {version!r} is not supported (gemm is)")
    if config.get("zero_point") is False:
        raise ConfigError(f"{QUANTIZATION_CONFIG}: AWQ without zero points is not supported")
    return CheckpointQuantization("awq", "int4")


def _compressed_tensors(config: dict) -> CheckpointQuantization:
    if config.get("format") != "int-quantized":
        raise ConfigError(f"{QUANTIZATION_CONFIG}: compressed-tensors format {config.get('format')!r} is not "
                          "supported (int-quantized is)")
    expected_weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    expected_inputs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    for name, group in (config.get("config_groups") or {}).items():
        for part, expected in (("weights", expected_weights), ("input_activations", expected_inputs)):
            given = group.get(part) or {}
            for key, value in expected.items():
                if given.get(key) != value:
                    raise ConfigError(f"{QUANTIZATION_CONFIG}: config_groups.{name}.{part}.{key} is {given.get(key)!r}; "
                                      f"llmserve loads {value!r} (int8 W8A8: per-channel weights, dynamic per-token inputs)")
    if not config.get("config_groups"):
        raise ConfigError(f"{QUANTIZATION_CONFIG}: compressed-tensors without config_groups")
    return CheckpointQuantization("compressed-tensors", "int8")


def model_info(model_config: ModelConfig, hf_config: dict) -> ModelInfo:
    """Combine the config file's overrides with the checkpoint's own values."""
    # a checkpoint llmserve cannot load stops the start here
    prequantized = checkpoint_quantization(hf_config)
    if prequantized and model_config.load_format != "dummy" and model_config.model_dtype == "float16":
        raise ConfigError(f"model_config.model_dtype: the checkpoint is {prequantized.scheme} {prequantized.method} "
                          "(its quantization_config), which runs with a float32 or bfloat16 model, not float16")
    max_len = model_config.max_seq_len or hf_config.get("max_position_embeddings") or 2048
    eos = model_config.end_token_id
    if eos is None:
        eos = _generation_config(model_config).get("eos_token_id", hf_config.get("eos_token_id"))
    if eos is None:
        eos = []
    elif isinstance(eos, int):
        eos = [eos]
    pad = model_config.pad_token_id if model_config.pad_token_id is not None else hf_config.get("pad_token_id")
    return ModelInfo(
        vocab_size=int(hf_config["vocab_size"]),
        max_seq_len=int(max_len),
        eos_token_ids=tuple(int(t) for t in eos),
        bos_token_id=hf_config.get("bos_token_id"),
        pad_token_id=pad,
    )


def checkpoint_eos_token_ids(model_config: ModelConfig, hf_config: dict) -> tuple[int, ...]:
    """Every end token the checkpoint names: config.json's eos_token_id and generation_config.json's."""
    ids: list[int] = []
    for eos in (hf_config.get("eos_token_id"), _generation_config(model_config).get("eos_token_id")):
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(dict.fromkeys(int(token_id) for token_id in ids))


def _generation_config(model_config: ModelConfig) -> dict:
    if model_config.model_path is None:
        return {}
    path = os.path.join(model_config.model_path, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def check_tensor_parallel(hf_config: dict, world: int) -> None:
    """Raise ValueError when the model cannot be split `world` ways (heads, KV heads, MLP, act-order groups)."""
    prequantized = checkpoint_quantization(hf_config)
    if world > 1 and prequantized and prequantized.desc_act:
        raise ValueError("a GPTQ act-order (desc_act) checkpoint's groups are scattered along the inputs, so its "
                         "row-parallel layers cannot be split over ranks; serve it with one")
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    intermediate = hf_config["intermediate_size"]
    if heads % world:
        raise ValueError(f"{world} ranks do not divide the {heads} attention heads")
    if kv_heads % world and world % kv_heads:
        raise ValueError(f"{world} ranks neither divide the {kv_heads} KV heads nor are a multiple of them")
    if intermediate % world:
        raise ValueError(f"{world} ranks do not divide the MLP's intermediate size {intermediate}")
