"""The reference attention backend, in plain torch on any device: gather each sequence's blocks, then SDPA.

The oracle of the other backends' tests and the fallback where they cannot run. Pools are
[num_blocks, block_size, num_kv_heads, head_dim]; an 8-bit cache's scales [num_blocks, block_size, num_kv_heads].
With an 8-bit cache every key and value attended is the cache's (this step's too): quantized, then read back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from llmserve.agent.layers.attention.base import (
    AttentionBackend, KVCache, LayerShape, StepAttention, dequantize_kv, quantize_kv,
)


@dataclass
class DecodeBatch:
    """The sequences adding one token this step, attended together in one batched call."""

    token_indices: Optional[torch.Tensor]  # [num_decodes] their rows in the step; None when every row decodes
    block_ids: torch.Tensor  # [num_decodes * blocks_per_seq] each sequence's blocks, row after row
    gathered: Optional[KVCache]  # where each layer gathers those blocks, [num_decodes * blocks_per_seq, block_size, ...]
    # (an 8-bit cache's are dequantized into fresh tensors)
    context_lens: torch.Tensor  # [num_decodes] on the device
    num_slots: int  # blocks_per_seq * block_size: the K/V length gathered per sequence
    dtype: torch.dtype
    _masks: dict = field(default_factory=dict, repr=False)  # by sliding window, built on first use

    def mask(self, sliding_window: Optional[int]) -> torch.Tensor:
        """Additive mask [num_decodes, 1, 1, num_slots]: 0 on the slots each sequence attends, -inf elsewhere."""
        if sliding_window not in self._masks:
            slots = torch.arange(self.num_slots, device=self.context_lens.device)
            ends = self.context_lens[:, None]
            is_visible = slots < ends
            if sliding_window is not None:
                is_visible &= slots >= ends - sliding_window
            self._masks[sliding_window] = _additive(is_visible, self.dtype)[:, None, None, :]
        return self._masks[sliding_window]


@dataclass
class PrefillSequence:
    """One sequence adding several tokens this step, after `cached_len` tokens written by earlier steps."""

    start: int  # its first row in the step
    end: int
    cached_len: int
    block_ids: Optional[torch.Tensor]  # [num_blocks] blocks holding its K/V; None when nothing was cached
    device: torch.device
    dtype: torch.dtype
    _masks: dict = field(default_factory=dict, repr=False)  # by sliding window, built on first use

    def mask(self, sliding_window: Optional[int]) -> Optional[torch.Tensor]:
        """Additive mask [query_len, context_len], or None where plain causal attention is exact."""
        query_len = self.end - self.start
        is_plain_causal = self.cached_len == 0 and (sliding_window is None or sliding_window >= query_len)
        if is_plain_causal:
            return None
        if sliding_window not in self._masks:
            query_positions = torch.arange(self.cached_len, self.cached_len + query_len, device=self.device)[:, None]
            key_positions = torch.arange(self.cached_len + query_len, device=self.device)[None, :]
            is_visible = key_positions <= query_positions
            if sliding_window is not None:
                is_visible &= key_positions > query_positions - sliding_window
            self._masks[sliding_window] = _additive(is_visible, self.dtype)
        return self._masks[sliding_window]


class TorchStepAttention(StepAttention):
    """Where this step's K/V are written, and which blocks each sequence reads."""

    def __init__(self, slot_mapping: torch.Tensor, decode: Optional[DecodeBatch], prefills: list[PrefillSequence]):
        self.slot_mapping = slot_mapping  # [num_tokens] block_id * block_size + offset of each new token
        self.decode = decode
        self.prefills = prefills

    @property
    def is_all_decode(self) -> bool:
        return self.decode is not None and self.decode.token_indices is None

    def attend(self, layer: LayerShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        k, v = self._write(layer, k, v, kv_cache)
        if self.is_all_decode:
            return _decode(layer, q, kv_cache, self.decode)
        out = torch.empty_like(q)
        if self.decode is not None:
            rows = self.decode.token_indices
            out[rows] = _decode(layer, q[rows], kv_cache, self.decode)
        for seq in self.prefills:
            rows = slice(seq.start, seq.end)
            out[rows] = _prefill(layer, q[rows], k[rows], v[rows], kv_cache, seq)
        return out

    def _write(self, layer: LayerShape, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v at their slots; the values attention reads back (8-bit: as the cache holds them)."""
        if len(kv_cache) == 2:
            for pool, x in zip(kv_cache, (k, v)):
                pool.view(-1, layer.num_kv_heads, layer.head_dim)[self.slot_mapping] = x
            return k, v
        stored = []
        for pool, scale_pool, x in zip(kv_cache[:2], kv_cache[2:], (k, v)):
            x_q, scales = quantize_kv(x)
            pool.view(-1, layer.num_kv_heads, layer.head_dim)[self.slot_mapping] = x_q
            scale_pool.view(-1, layer.num_kv_heads)[self.slot_mapping] = scales
            stored.append(dequantize_kv(x_q, scales, x.dtype))
        return stored[0], stored[1]


class TorchAttention(AttentionBackend):
    """Builds each step's TorchStepAttention, reusing the decode gather buffers across steps."""

    name = "torch"

    def __init__(
        self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        kv_cache_dtype: str = "auto",
    ):
        super().__init__(block_size, num_kv_heads, head_dim, dtype, device, kv_cache_dtype)
        # A fresh megabyte-sized gather per layer per step costs more in page faults than the gather itself.
        empty = torch.empty((0, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
        self.gathered_k = self.gathered_v = empty

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def scale_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.block_size, self.num_kv_heads)

    def build(
        self,
        slot_mapping: torch.Tensor,
        query_lens: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> TorchStepAttention:
        """One decode batch for the sequences adding a token, one PrefillSequence per other; inputs on the host."""
        slot_mapping = slot_mapping.to(self.device)
        is_decode = query_lens == 1
        if bool(is_decode.all()):
            return TorchStepAttention(slot_mapping, self._decode_batch(None, context_lens, block_tables), [])
        token_starts = torch.cumsum(query_lens, 0) - query_lens
        decode_rows = is_decode.nonzero().flatten()
        decode = None
        if len(decode_rows):
            token_indices = token_starts[decode_rows].to(self.device)
            decode = self._decode_batch(token_indices, context_lens[decode_rows], block_tables[decode_rows])
        prefills = [
            self._prefill_sequence(start, query_len, context_len, block_table)
            for start, query_len, context_len, block_table, decodes in zip(
                token_starts.tolist(), query_lens.tolist(), context_lens.tolist(), block_tables, is_decode.tolist()
            )
            if not decodes
        ]
        return TorchStepAttention(slot_mapping, decode, prefills)

    def _decode_batch(
        self, token_indices: Optional[torch.Tensor], context_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> DecodeBatch:
        # Gather only as many blocks as the longest sequence uses, not the table's padded width.
        blocks_per_seq = -(-int(context_lens.max()) // self.block_size)
        block_ids = block_tables[:, :blocks_per_seq].flatten().to(self.device)
        return DecodeBatch(
            token_indices,
            block_ids,
            None if self.quantized_kv else self._gather_buffers(len(block_ids)),
            context_lens.to(self.device),
            blocks_per_seq * self.block_size,
            self.dtype,
        )

    def _gather_buffers(self, num_blocks: int) -> KVCache:
        """Room for num_blocks blocks of K and of V, grown when a step needs more; valid until the next build."""
        if num_blocks > self.gathered_k.shape[0]:
            shape = (max(num_blocks, 2 * self.gathered_k.shape[0]), *self.gathered_k.shape[1:])
            self.gathered_k = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.gathered_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.gathered_k[:num_blocks], self.gathered_v[:num_blocks]

    def _prefill_sequence(
        self, start: int, query_len: int, context_len: int, block_table: torch.Tensor
    ) -> PrefillSequence:
        cached_len = context_len - query_len
        block_ids = None
        if cached_len > 0:
            block_ids = block_table[: -(-context_len // self.block_size)].to(self.device)
        return PrefillSequence(start, start + query_len, cached_len, block_ids, self.device, self.dtype)


def _read_blocks(
    kv_cache: KVCache, block_ids: torch.Tensor, dtype: torch.dtype, out: Optional[KVCache] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V of blocks `block_ids` [n] as [n, block_size, num_kv_heads, head_dim] of `dtype` (into `out`
    where the pools are of that dtype already; an 8-bit cache's dequantized)."""
    if len(kv_cache) == 2:
        if out is None:
            return kv_cache[0].index_select(0, block_ids), kv_cache[1].index_select(0, block_ids)
        return tuple(torch.index_select(pool, 0, block_ids, out=buffer) for pool, buffer in zip(kv_cache, out))
    return tuple(
        dequantize_kv(pool.index_select(0, block_ids), scales.index_select(0, block_ids), dtype)
        for pool, scales in zip(kv_cache[:2], kv_cache[2:])
    )


def _additive(is_visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(is_visible.shape, dtype=dtype, device=is_visible.device)
    return mask.masked_fill_(~is_visible, float("-inf"))


def _decode(layer: LayerShape, q: torch.Tensor, kv_cache: KVCache, decode: DecodeBatch) -> torch.Tensor:
    """q [num_decodes, num_heads, head_dim] -> like q, one SDPA call for the whole batch."""
    num_decodes = q.shape[0]
    k, v = (
        blocks.view(num_decodes, decode.num_slots, layer.num_kv_heads, layer.head_dim)
        .transpose(1, 2)  # [num_decodes, num_kv_heads, num_slots, head_dim]
        for blocks in _read_blocks(kv_cache, decode.block_ids, q.dtype, decode.gathered)
    )
    mask = decode.mask(layer.sliding_window)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, enable_gqa=True)
    return out.squeeze(2)


def _prefill(
    layer: LayerShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, seq: PrefillSequence
) -> torch.Tensor:
    """q [query_len, num_heads, head_dim], this step's k and v [query_len, num_kv_heads, head_dim] -> like q."""
    if seq.block_ids is not None:
        context_len = seq.cached_len + q.shape[0]
        k, v = (blocks.flatten(0, 1)[:context_len] for blocks in _read_blocks(kv_cache, seq.block_ids, q.dtype))
    mask = seq.mask(layer.sliding_window)
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [heads, len, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(0, 1)
