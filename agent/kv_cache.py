"""The paged KV cache: per layer, a pool of K blocks and a pool of V blocks on the device."""
from __future__ import annotations

import torch

from llmserve.agent.models.llama import DecoderConfig


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed (K pool, V pool) per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], pairs: torch.Tensor) -> None:
    """Copy whole blocks `pairs[:, 0]` onto `pairs[:, 1]` in every layer (copy-on-write of shared blocks)."""
    if len(pairs) == 0:
        return
    source, destination = pairs[:, 0], pairs[:, 1]
    for k_pool, v_pool in kv_caches:
        k_pool[destination] = k_pool[source]
        v_pool[destination] = v_pool[source]


def kv_cache_bytes_per_block(hf_config: dict, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V: what a memory budget is divided by."""
    config = DecoderConfig.from_hf(hf_config)
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_size
