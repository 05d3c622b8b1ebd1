"""The attention seam: a backend owns the KV pools' layout, builds each step's attention once, and runs it per layer.

The model names no backend: its PagedAttention layers call the step's `StepAttention`, which the
backend chosen at load time built from the step arrays (explicit metadata, shared by all layers).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch

# One layer's K pool and V pool, block ids first; an 8-bit cache adds the K and V scales, one per token and head.
KVCache = tuple[torch.Tensor, ...]
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, heads, head_dim] -> (int8 like x, float32 scales [tokens, heads]): symmetric per token and head."""
    scales = x.float().abs().amax(dim=-1).clamp(min=1e-8) / 127
    return torch.round(x.float() / scales[..., None]).clamp(-127, 127).to(torch.int8), scales


def dequantize_kv(x_q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quantize_kv's values back, as `dtype`: int8 [..., head_dim] times their scales [...]."""
    return x_q.to(dtype) * scales.to(dtype)[..., None]


@dataclass(frozen=True)
class LayerShape:
    """What one attention layer looks like to a backend."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: Optional[int]  # attend to the last this-many positions (itself included); None: all

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


class StepAttention(abc.ABC):
    """One step's attention metadata, built once for all layers."""

    @abc.abstractmethod
    def attend(self, layer: LayerShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Write this step's k, v into the pools, then attend: q [num_tokens, num_heads, head_dim],
        k and v [num_tokens, num_kv_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""


class AttentionBackend(abc.ABC):
    """Paged attention over one device's KV pools."""

    name = ""

    def __init__(
        self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        kv_cache_dtype: str = "auto",
    ):
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.quantized_kv = kv_cache_dtype == "int8"

    @staticmethod
    def unsupported(
        block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device, kv_cache_dtype: str = "auto"
    ) -> Optional[str]:
        """Why this backend cannot run this model here, or None when it can."""
        return None

    @property
    def description(self) -> str:
        """What runs, for the start-up log and /health."""
        return self.name + (", int8 KV cache" if self.quantized_kv else "")

    @abc.abstractmethod
    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape of one K (or V) pool of `num_blocks` blocks; the block index comes first."""

    @abc.abstractmethod
    def scale_shape(self, num_blocks: int) -> tuple[int, ...]:
        """An 8-bit cache's K (or V) scales: the pool's shape without head_dim."""

    def pools(self, num_blocks: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each tensor of one layer's KVCache."""
        if not self.quantized_kv:
            return [(self.pool_shape(num_blocks), self.dtype)] * 2
        return [(self.pool_shape(num_blocks), torch.int8)] * 2 + [(self.scale_shape(num_blocks), torch.float32)] * 2

    @abc.abstractmethod
    def build(
        self, slot_mapping: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> StepAttention:
        """The step's attention from its host arrays: each new token's slot (block_id * block_size + offset),
        each sequence's new tokens and whole context, and its block table [num_seqs, width] (int32)."""
