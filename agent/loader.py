"""Build a model from its config and fill its weights from safetensors files or a seeded generator."""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from torch import nn

from llmserve.agent.layers.norm import RMSNorm
from llmserve.agent.models import model_class
from llmserve.agent.layers.quantization import CheckpointGrid
from llmserve.agent.quantized_checkpoint import dequantized
from llmserve.agent.tensor_parallel import Shard, local_config, shard_grid, shard_weight
from llmserve.common.model_info import checkpoint_quantization

SAFETENSORS_INDEX = "model.safetensors.index.json"
COMPUTED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    hf_config: dict,
    model_path: Optional[str],
    load_format: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    shard: Shard = Shard(),
    num_layers: Optional[int] = None,
) -> nn.Module:
    """The model in eval mode on `device` with `dtype`, its weights from `model_path` or random ("dummy").

    With tensor parallelism the model is this rank's share (`shard`), cut from the same full weights. With
    `num_layers`, only the first that-many decoder layers are kept (a speculative draft sliced from the
    model: the same embeddings, layers, final norm and LM head, the later layers skipped).
    """
    sliced = hf_config if num_layers is None else {**hf_config, "num_hidden_layers": num_layers}
    with torch.device("meta"):  # shapes only: every parameter is replaced below, so none is initialised twice
        model = model_class(hf_config)(local_config(sliced, shard))
        full_model = model_class(hf_config)(hf_config) if shard.world > 1 or num_layers is not None else model
    if load_format == "dummy":
        weights = _dummy_weights(full_model, hf_config.get("initializer_range", 0.02), seed)
    elif load_format in ("auto", "safetensors"):
        weights = _safetensors_weights(_checkpoint_files(model_path))
    else:
        raise ValueError(f"load_format {load_format!r} is not supported; use 'auto', 'safetensors' or 'dummy'")
    if num_layers is not None:
        weights = ((name, tensor) for name, tensor in weights if _layer_index(name) < num_layers)
    grids: dict[str, CheckpointGrid] = {}
    prequantized = checkpoint_quantization(hf_config) if load_format != "dummy" else None
    if prequantized:
        weights = dequantized(weights, prequantized, grids)
    shares = ((name, shard_weight(name, tensor, hf_config, shard)) for name, tensor in weights)
    _assign_weights(model, shares, dtype, torch.device(device))
    tied = getattr(model, "tied_weights", {})
    for name, grid in grids.items():  # what agent/layers/quantization rounds the weights back onto
        if name not in tied:  # a tied copy was not loaded: the layer computes with its source's float weights
            model.get_parameter(name).checkpoint_grid = shard_grid(name, grid, hf_config, shard)
    return model.to(device).eval()


LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _layer_index(name: str) -> int:
    """The decoder layer a weight belongs to (-1 for embeddings, final norm, LM head)."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else -1


def _checkpoint_files(model_path: Optional[str]) -> list[str]:
    """The safetensors files of a checkpoint, as its index lists them when it has one."""
    if model_path is None:
        raise ValueError("load_format 'safetensors' needs a model_path; use load_format 'dummy' for random weights")
    index_path = os.path.join(model_path, SAFETENSORS_INDEX)
    if os.path.exists(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, name) for name in names]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_path} has no *.safetensors files; convert the checkpoint or use load_format 'dummy'")
    return files


def _safetensors_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as checkpoint:
            for name in checkpoint.keys():
                if not name.endswith(COMPUTED_BUFFER_SUFFIXES):
                    yield name, checkpoint.get_tensor(name)


def _dummy_weights(model: nn.Module, std: float, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Normal(0, std) matrices, ones for norm gains, zeros for biases; the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    norm_gains = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    for name, param in _expected_parameters(model).items():
        if name.endswith(".bias"):
            yield name, torch.zeros(param.shape)
        elif name in norm_gains:
            yield name, torch.ones(param.shape)
        else:
            yield name, torch.empty(param.shape).normal_(0.0, std, generator=generator)


def _expected_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that needs a tensor of its own (tied ones borrow their source's)."""
    tied = getattr(model, "tied_weights", {})
    return {name: param for name, param in model.named_parameters() if name not in tied}


def _assign_weights(
    model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, device: torch.device
) -> None:
    """Replace each meta parameter with its weight; strict: a missing or unexpected name is a ValueError."""
    expected = _expected_parameters(model)
    tied = getattr(model, "tied_weights", {})
    missing = set(expected)
    for name, tensor in weights:
        if name in tied:
            continue  # some checkpoints store the tied copy as well; the source's tensor is used
        if name not in expected:
            raise ValueError(f"unexpected weight {name!r} in the checkpoint: the model has no such parameter")
        if tensor.shape != expected[name].shape:
            expected_shape = list(expected[name].shape)
            raise ValueError(f"weight {name!r} has shape {list(tensor.shape)}; the model's is {expected_shape}")
        _set_parameter(model, name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        missing.discard(name)
    if missing:
        raise ValueError(f"the checkpoint lacks weights: {', '.join(sorted(missing))}")
    for name, source in tied.items():
        _set_parameter(model, name, model.get_parameter(source))


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, param_name = name.rpartition(".")
    setattr(model.get_submodule(module_name), param_name, param)
