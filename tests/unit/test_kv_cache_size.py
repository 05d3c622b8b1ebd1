"""The KV cache's size: a block count, or a memory budget turned into blocks, refused at start when it does not fit."""
from __future__ import annotations

import pytest

from llmserve.agent.kv_cache import block_bytes, kv_cache_size
from llmserve.common.config import PagedAttentionConfig

MIB = 2**20
BLOCK = 64 * 1024  # bytes of one block
PER_SEQ, SEQS = 128, 64  # blocks one sequence of max_seq_len needs; the decode batch


def size(available: int = 8 * 1024 * MIB, ranks: int = 1, **pa) -> int:
    return kv_cache_size(PagedAttentionConfig(**pa), BLOCK, available, PER_SEQ, SEQS, ranks).num_blocks


def test_block_bytes_count_k_and_v_of_every_layer():
    import torch

    from llmserve.agent.layers.attention.torch_backend import TorchAttention

    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        backend = TorchAttention(16, 4, 32, dtype, torch.device("cpu"))
        assert block_bytes(num_layers=4, pools_of_one_block=backend.pools(1)) == 2 * 4 * 16 * 4 * 32 * size
    int8 = TorchAttention(16, 4, 32, torch.bfloat16, torch.device("cpu"), kv_cache_dtype="int8")
    assert block_bytes(4, int8.pools(1)) == 2 * 4 * 16 * 4 * (32 + 4)  # a byte a value, a float32 scale a head


def test_a_block_count_is_taken_as_it_is():
    assert size(num_blocks=300) == 300


def test_a_memory_budget_is_divided_by_the_block_bytes():
    assert size(kv_cache_memory="100MiB") == 1600
    assert size(kv_cache_memory=100 * MIB + BLOCK - 1) == 1600


def test_auto_takes_half_the_available_memory_shared_by_the_ranks_of_the_host():
    assert size(available=512 * MIB) == 4096
    assert size(available=512 * MIB, ranks=2) == 2048
    assert size(available=512 * MIB, memory_utilization=0.25) == 2048


def test_a_budget_never_allocates_more_than_the_decode_batch_can_use():
    assert size(available=1024**4) == PER_SEQ * SEQS


def test_a_budget_smaller_than_one_longest_sequence_is_refused():
    with pytest.raises(ValueError, match="fewer than the 128 blocks one sequence"):
        size(kv_cache_memory="1MiB")


@pytest.mark.parametrize("pa", [{"num_blocks": 100_000}, {"kv_cache_memory": "400MiB"}])
def test_more_than_the_memory_available_is_refused(pa):
    with pytest.raises(ValueError, match="are available after the weights"):
        size(available=256 * MIB, **pa)
