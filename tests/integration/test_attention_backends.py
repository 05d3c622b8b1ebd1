"""Every attention backend against dense attention computed here: scattered block tables, contexts of 1 to
2000 tokens, decodes beside chunked and fresh prefills in one step, GQA, sliding windows, float32 and bfloat16."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from llmserve.agent import cpu_ops
from llmserve.agent import kernels
from llmserve.agent.layers.attention import LayerShape, attention_backend, cpu_backend
from llmserve.agent.layers.attention.base import quantize_kv

DEVICE = torch.device(os.environ.get("LLMSERVE_TEST_DEVICE", "cpu"))
BLOCK_SIZE = 16
HEAD_DIM = 64
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
MAX_CHECKED_QUERIES = 300


def backends() -> list:
    cpu = pytest.param("cpu", marks=pytest.mark.skipif(
        DEVICE.type != "cpu" or isinstance(cpu_ops.load(), cpu_ops.Unavailable),
        reason=f"the cpu backend cannot run here: {getattr(cpu_ops.load(), 'reason', DEVICE.type)}",
    ))
    return ["torch", cpu]


# (context length after the step, tokens this step): decodes, chunked prefills (some context cached), fresh prefills
SEQUENCES = [(1, 1), (2000, 1), (33, 1), (700, 1), (129, 57), (1000, 100), (17, 17), (64, 64), (5, 3), (300, 1)]


def dense_attention(q, k, v, num_cached: int, window, num_kv_heads: int) -> torch.Tensor:
    """q [query_len, heads, dim] at positions num_cached.., over k, v [context_len, kv_heads, dim], in float64."""
    query_len, num_heads, _ = q.shape
    group = num_heads // num_kv_heads
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    query_pos = torch.arange(num_cached, num_cached + query_len)[:, None]
    key_pos = torch.arange(k.shape[1])[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible.to(q.device))
    return out.transpose(0, 1)


class Pool:
    """The KV pools of one layer and scattered block tables for the test's sequences."""

    def __init__(self, backend, num_kv_heads: int, dtype: torch.dtype, seed: int):
        generator = torch.Generator().manual_seed(seed)
        blocks_needed = [-(-context // BLOCK_SIZE) for context, _ in SEQUENCES]
        num_blocks = sum(blocks_needed) + 7
        order = torch.randperm(num_blocks, generator=generator).tolist()
        self.tables = []
        for count in blocks_needed:
            self.tables.append(order[:count])
            order = order[count:]
        self.kv_cache = tuple(torch.zeros(shape, dtype=kind, device=DEVICE) for shape, kind in backend.pools(num_blocks))
        width = max(blocks_needed)
        self.block_tables = torch.zeros(len(SEQUENCES), width, dtype=torch.int32)
        for row, table in enumerate(self.tables):
            self.block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)

    def slots(self, row: int, positions: range) -> list[int]:
        return [self.tables[row][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


def run_step(backend, layer, pool, rows, spans, q, k, v):
    """One step over `rows` (sequence indexes), each adding the positions of its span."""
    slot_mapping = torch.tensor([s for row, span in zip(rows, spans) for s in pool.slots(row, span)], dtype=torch.int64)
    query_lens = torch.tensor([len(span) for span in spans], dtype=torch.int32)
    context_lens = torch.tensor([span.stop for span in spans], dtype=torch.int32)
    step = backend.build(slot_mapping, query_lens, context_lens, pool.block_tables[rows])
    return step.attend(layer, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), pool.kv_cache).cpu()


@pytest.mark.parametrize("name", backends())
@pytest.mark.parametrize("num_heads, num_kv_heads, window, kv_cache_dtype", [
    (8, 2, None, "auto"), (4, 4, None, "auto"), (8, 2, 37, "auto"), (4, 4, 37, "auto"),
    (8, 2, None, "int8"),  # the 8-bit cache's paths do not depend on the heads or the window
], ids=["gqa4", "mha", "gqa4-window37", "mha-window37", "gqa4-int8-cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("decodes_apart", [False, True], ids=["mixed", "decodes-apart"])
def test_steps_equal_dense_attention(name, num_heads, num_kv_heads, window, dtype, decodes_apart, kv_cache_dtype,
                                     monkeypatch):
    """Step 1 prefills what each sequence has cached; then one step mixes decodes and prefills, or a step of
    decodes only (the backends' decode path, at any batch size) comes before a step of the prefills. With an
    8-bit cache, the dense attention reads the keys and values as the cache stores them."""
    monkeypatch.setattr(cpu_backend, "DECODE_KERNEL_MIN_SEQS", 1)
    if kv_cache_dtype == "int8" and name == "cpu" and isinstance(kernels.load(), kernels.Unavailable):
        pytest.skip("the cpu backend reads an 8-bit cache with llmserve's kernels, not built here")
    backend = attention_backend(name, BLOCK_SIZE, num_kv_heads, HEAD_DIM, dtype, DEVICE, kv_cache_dtype)
    layer = LayerShape(num_heads, num_kv_heads, HEAD_DIM, window)
    pool = Pool(backend, num_kv_heads, dtype, seed=num_heads + (window or 0))
    generator = torch.Generator().manual_seed(1)
    keys = [torch.randn(context, num_kv_heads, HEAD_DIM, generator=generator).to(dtype) for context, _ in SEQUENCES]
    values = [torch.randn(context, num_kv_heads, HEAD_DIM, generator=generator).to(dtype) for context, _ in SEQUENCES]
    queries = [torch.randn(context, num_heads, HEAD_DIM, generator=generator).to(dtype) for context, _ in SEQUENCES]
    stored_keys, stored_values = keys, values
    if kv_cache_dtype == "int8":
        stored_keys, stored_values = ([q.double() * scales.double()[..., None] for q, scales in map(quantize_kv, xs)]
                                      for xs in (keys, values))

    steps = [[(row, range(0, context - new)) for row, (context, new) in enumerate(SEQUENCES) if context > new]]
    last = [(row, range(context - new, context)) for row, (context, new) in enumerate(SEQUENCES)]
    steps += [[r for r in last if len(r[1]) == 1], [r for r in last if len(r[1]) > 1]] if decodes_apart else [last]
    for step in steps:
        rows = [row for row, _ in step]
        spans = [span for _, span in step]
        out = run_step(backend, layer, pool, rows, spans, *(
            torch.cat([x[row][span.start : span.stop] for row, span in step]) for x in (queries, keys, values)
        ))
        start = 0
        for row, span in step:
            start += len(span)
            if len(span) > MAX_CHECKED_QUERIES:  # the long prefills of step 1 only set up the later steps
                continue
            expected = dense_attention(queries[row][span.start : span.stop], stored_keys[row][: span.stop],
                                       stored_values[row][: span.stop], span.start, window, num_kv_heads)
            got = out[start - len(span) : start]
            torch.testing.assert_close(got.double(), expected.cpu(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype],
                                       msg=lambda m: f"sequence {row} ({span}): {m}")


def test_auto_falls_back_to_torch_where_the_cpu_kernels_cannot_run(monkeypatch):
    monkeypatch.setattr(cpu_ops, "load", lambda: cpu_ops.Unavailable("no kernels in this test"))
    backend = attention_backend("auto", BLOCK_SIZE, 4, HEAD_DIM, torch.float32, torch.device("cpu"))
    assert backend.name == "torch"
    with pytest.raises(ValueError, match="attention_backend: cpu cannot run here: no kernels in this test"):
        attention_backend("cpu", BLOCK_SIZE, 4, HEAD_DIM, torch.float32, torch.device("cpu"))


def test_auto_picks_the_cpu_kernels_where_they_run():
    if isinstance(cpu_ops.load(), cpu_ops.Unavailable):
        pytest.skip(cpu_ops.load().reason)
    assert attention_backend("auto", BLOCK_SIZE, 4, HEAD_DIM, torch.float32, torch.device("cpu")).name == "cpu"
