"""Paged attention: the model's layer, and the backends it runs on, chosen once at load time.

Backends (imported only when chosen): `cpu` reads the block pools in place with vLLM's compiled CPU
kernels (AVX-512 or AVX2); `torch` gathers blocks and calls SDPA, on any device: the reference the
others are tested against, and the fallback. `auto` takes the first that runs here.
"""
from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch
from torch import nn

from llmserve.agent.layers.attention.base import KV_CACHE_DTYPES, AttentionBackend, KVCache, LayerShape, StepAttention

logger = logging.getLogger("llmserve.agent")

BACKENDS = {  # name -> (module, class), imported lazily
    "cpu": ("llmserve.agent.layers.attention.cpu_backend", "CpuAttention"),
    "torch": ("llmserve.agent.layers.attention.torch_backend", "TorchAttention"),
}
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("torch",)}

__all__ = ["AttentionBackend", "KVCache", "LayerShape", "PagedAttention", "StepAttention", "attention_backend"]


class PagedAttention(nn.Module):
    """Causal attention of this step's queries over each sequence's K/V in the block pools."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: Optional[int] = None):
        super().__init__()
        self.shape = LayerShape(num_heads, num_kv_heads, head_dim, sliding_window)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, attention: StepAttention
    ) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k and v [num_tokens, num_kv_heads, head_dim] -> like q."""
        return attention.attend(self.shape, q, k, v, kv_cache)


def attention_backend(
    name: str, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
    kv_cache_dtype: str = "auto",
) -> AttentionBackend:
    """The backend `name` names (`auto`: the first of AUTO_ORDER that runs here) with pools of `kv_cache_dtype`
    (auto: the model's dtype; int8); ValueError if a named one cannot run."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    names = AUTO_ORDER.get(device.type, ("torch",)) if name == "auto" else (name,)
    if any(candidate not in BACKENDS for candidate in names):
        raise ValueError(f"attention_backend: {name!r} is not one of auto, {', '.join(BACKENDS)}")
    for candidate in names:
        cls = _backend_class(candidate)
        problem = cls.unsupported(block_size, head_dim, dtype, device, kv_cache_dtype)
        if problem is None:
            return cls(block_size, num_kv_heads, head_dim, dtype, device, kv_cache_dtype)
        if name != "auto":
            raise ValueError(f"attention_backend: {name} cannot run here: {problem}")
        logger.warning("attention backend %s cannot run here (%s); trying the next", candidate, problem)
    raise AssertionError("the torch backend runs anywhere")


def _backend_class(name: str) -> type:
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)
