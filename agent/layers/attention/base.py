"""The attention seam: a backend owns the KV pools' layout, builds each step's attention once, and runs it per layer.

The model names no backend: its PagedAttention layers call the step's `StepAttention`, which the
backend chosen at load time built from the step arrays (explicit metadata, shared by all layers).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]  # one layer's K pool and V pool, block ids first


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

    def __init__(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device

    @staticmethod
    def unsupported(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
        """Why this backend cannot run this model here, or None when it can."""
        return None

    @property
    def description(self) -> str:
        """What runs, for the start-up log and /health."""
        return self.name

    @abc.abstractmethod
    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape of one K (or V) pool of `num_blocks` blocks; the block index comes first."""

    @abc.abstractmethod
    def build(
        self, slot_mapping: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> StepAttention:
        """The step's attention from its host arrays: each new token's slot (block_id * block_size + offset),
        each sequence's new tokens and whole context, and its block table [num_seqs, width] (int32)."""
