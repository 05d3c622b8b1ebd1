"""Rotary position embedding (RoPE) with the default, linear, dynamic and llama3 frequency schemes."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from llmserve.agent import cpu_ops


def rope_parameters(hf_config: dict) -> dict:
    """The config's rope settings in the transformers-5 form: rope_theta, rope_type and any scaling keys."""
    legacy_scaling = hf_config.get("rope_scaling") or {}
    params = {**legacy_scaling, **(hf_config.get("rope_parameters") or {})}
    params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(params: dict, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32: the angle per position step of each rotated pair of channels."""
    rope_type = params["rope_type"]
    if rope_type not in FREQUENCY_SCALINGS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(FREQUENCY_SCALINGS)}")
    # Explicit device: the model is built on the meta device, and this buffer is computed, not loaded.
    channel_pairs = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (params["rope_theta"] ** (channel_pairs / head_dim))
    return FREQUENCY_SCALINGS[rope_type](inv_freq, params)


def _unscaled(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    return inv_freq


def _linear(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    return inv_freq / params["factor"]


def _llama3(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: slow the low frequencies by `factor`, keep the high ones, blend in between."""
    factor, low_factor, high_factor = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original_len / low_factor, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_factor) / (high_factor - low_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= original_len / high_factor) & (wavelen <= original_len / low_factor)
    return torch.where(is_medium, blended, scaled)


# Dynamic NTK only rescales past max_position_embeddings, where the reference re-rotates the whole cache;
# a paged cache cannot, so within the trained length (where they agree) it is the unscaled rope.
FREQUENCY_SCALINGS: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {
    "default": _unscaled,
    "linear": _linear,
    "dynamic": _unscaled,
    "llama3": _llama3,
}


class RotaryEmbedding(nn.Module):
    """Each token's rotation, worked out once per step for all layers: `rope = rotary(positions)`, then
    `q, k = rope(q, k)` in every layer."""

    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", inverse_frequencies(params, head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> "Rope":
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [num_tokens, head_dim // 2]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return TorchRope(angles.cos().to(dtype), angles.sin().to(dtype))


class Rope:
    """One step's rotation of q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim]."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TorchRope(Rope):
    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin  # each [num_tokens, 1, head_dim], broadcasting over heads

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head of x [num_tokens, num_heads, head_dim] by its token's angles (half-split pairs)."""
    first_half, second_half = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second_half, first_half), dim=-1) * sin


class CpuRotaryEmbedding(nn.Module):
    """RotaryEmbedding's rotation in place, with vLLM's CPU kernel, from a table of every position's cos and sin."""

    def __init__(self, rotary: RotaryEmbedding, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.head_dim = rotary.head_dim
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * rotary.inv_freq[None, :]
        # [max_positions, head_dim]: cos of each pair's angle, then sin (the kernel's layout)
        self.register_buffer("cos_sin", torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return CpuRope(positions, self.cos_sin, self.head_dim)


class CpuRope(Rope):
    def __init__(self, positions: torch.Tensor, cos_sin: torch.Tensor, head_dim: int):
        self.positions, self.cos_sin, self.head_dim = positions, cos_sin, head_dim

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The kernel takes [num_tokens, heads * head_dim] rows (here views of the qkv output) and rotates them in place.
        cpu_ops.load().ops.rotary_embedding(self.positions, q.view(len(q), -1), k.view(len(k), -1), self.head_dim, self.cos_sin, True)
        return q, k
