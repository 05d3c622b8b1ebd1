"""The paged KV cache: per layer, a pool of K blocks and a pool of V blocks on the device."""
from __future__ import annotations

import math
from dataclasses import dataclass

import psutil
import torch

from llmserve.common.config import PagedAttentionConfig


def allocate_kv_cache(
    num_layers: int, pools: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device
) -> list[tuple[torch.Tensor, ...]]:
    """Zeroed pools per layer, as the attention backend lays them out ((shape, dtype) each, block ids first):
    K and V, and an 8-bit cache's scales."""
    return [tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in pools) for _ in range(num_layers)]


def copy_blocks(kv_caches: list[tuple[torch.Tensor, ...]], pairs: torch.Tensor) -> None:
    """Copy whole blocks `pairs[:, 0]` onto `pairs[:, 1]` in every layer (copy-on-write of shared blocks)."""
    if len(pairs) == 0:
        return
    source, destination = pairs[:, 0], pairs[:, 1]
    for pools in kv_caches:
        for pool in pools:
            pool[destination] = pool[source]


@dataclass(frozen=True)
class KVCacheSize:
    """How many blocks an agent allocates, and what they cost."""

    num_blocks: int
    block_bytes: int  # one block across all layers, K and V, on this rank

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes


def block_bytes(num_layers: int, pools_of_one_block: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes one block takes across all layers, K and V (and an 8-bit cache's scales): what a memory budget is
    divided by. `pools_of_one_block`: the attention backend's pools of one block."""
    one_layer = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in pools_of_one_block)
    return num_layers * one_layer


def kv_cache_size(
    pa: PagedAttentionConfig, block_bytes: int, available_bytes: int, blocks_per_seq: int, max_num_seqs: int,
    num_local_ranks: int = 1,
) -> KVCacheSize:
    """The blocks to allocate: pa_config.num_blocks, else what the budget holds (kv_cache_memory, or
    memory_utilization of the memory available after the weights, shared by the ranks of one host),
    at most what max_num_seqs sequences of the longest length can use.

    Raises ValueError, naming the key, when the blocks do not fit in the memory available, or when a
    budget holds less than one sequence of the longest length.
    """
    if pa.num_blocks != "auto":
        size = KVCacheSize(pa.num_blocks, block_bytes)
        key, wanted = "num_blocks", size.num_bytes
    else:
        share = pa.memory_utilization if pa.memory_utilization is not None else pa.DEFAULT_MEMORY_UTILIZATION
        budget = pa.kv_cache_bytes if pa.kv_cache_bytes is not None else int(share * available_bytes / num_local_ranks)
        num_blocks = min(budget // block_bytes, blocks_per_seq * max_num_seqs)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"kv_cache_memory / memory_utilization: {_size(budget)} holds {num_blocks} blocks of {_size(block_bytes)}, "
                f"fewer than the {blocks_per_seq} blocks one sequence of model_config.max_seq_len needs: give the cache "
                "more memory or lower max_seq_len"
            )
        size = KVCacheSize(num_blocks, block_bytes)
        key, wanted = "kv_cache_memory" if pa.kv_cache_bytes is not None else "memory_utilization", size.num_bytes
    if wanted > available_bytes:
        raise ValueError(
            f"{key}: {size.num_blocks} blocks need {_size(wanted)}, but only {_size(available_bytes)} are available "
            "after the weights"
        )
    return size


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} bytes"


def available_memory(device: torch.device) -> int:
    """Bytes this agent may still allocate: free device memory on CUDA, available host memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available
