"""Megatron-style tensor parallelism: which slice of each weight a rank holds, and the all-reduces that join them.

Attention heads and KV heads are split across ranks (column-parallel q/k/v and
gate/up, row-parallel o and down, an all-reduce of their outputs); the
embedding, the norms and the LM head are replicated. With more ranks than KV
heads each KV head is replicated on `world / num_kv_heads` ranks. Biases of the
row-parallel layers are kept on rank 0 only, so the all-reduce adds them once.
"""
from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

COLUMN_PARALLEL = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
ROW_PARALLEL = re.compile(r"\.(o_proj|down_proj)\.(weight|bias)$")
KV_PROJECTIONS = ("k_proj", "v_proj")


@dataclass(frozen=True)
class Shard:
    """This rank's place in the tensor-parallel group."""

    rank: int = 0
    world: int = 1


def local_config(hf_config: dict, shard: Shard) -> dict:
    """The config of the model one rank builds: its share of the heads and of the MLP."""
    if shard.world == 1:
        return hf_config
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    return {
        **hf_config,
        "num_attention_heads": heads // shard.world,
        "num_key_value_heads": max(kv_heads // shard.world, 1),
        "intermediate_size": hf_config["intermediate_size"] // shard.world,
        "head_dim": hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
    }


def shard_weight(name: str, tensor: torch.Tensor, hf_config: dict, shard: Shard) -> torch.Tensor:
    """The part of the full checkpoint tensor `name` that this rank holds."""
    if shard.world == 1:
        return tensor
    if COLUMN_PARALLEL.search(name):
        return _rows(name, tensor, hf_config, shard).clone()  # a copy, so the full tensor can be freed
    if ROW_PARALLEL.search(name):
        if name.endswith(".bias"):
            return tensor if shard.rank == 0 else torch.zeros_like(tensor)
        return tensor.chunk(shard.world, dim=1)[shard.rank].contiguous()
    return tensor


def _rows(name: str, tensor: torch.Tensor, hf_config: dict, shard: Shard) -> torch.Tensor:
    """Output rows of a column-parallel layer; KV heads are replicated when there are fewer than ranks."""
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if any(f".{p}." in name for p in KV_PROJECTIONS) and kv_heads < shard.world:
        head = shard.rank * kv_heads // shard.world
        return tensor.chunk(kv_heads, dim=0)[head]
    return tensor.chunk(shard.world, dim=0)[shard.rank]


class AllReduceTimer:
    """Milliseconds spent in all-reduces since the last `take` (a part of the predict stage)."""

    def __init__(self) -> None:
        self.ms = 0.0

    def take(self) -> float:
        ms, self.ms = self.ms, 0.0
        return ms


def add_all_reduces(model: nn.Module, timer: AllReduceTimer) -> None:
    """Sum the outputs of every row-parallel layer across the ranks, timing each sum."""

    def reduce_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(output)
        timer.ms += (time.perf_counter() - start) * 1e3
        return output

    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            module.register_forward_hook(reduce_output)


def init_group(backend: str, address: str, port: int, shard: Shard, timeout_s: float) -> None:
    """Join the ranks' process group (gloo on CPU, NCCL on GPU); every rank blocks until all have joined."""
    dist.init_process_group(
        backend, init_method=f"tcp://{address}:{port}", rank=shard.rank, world_size=shard.world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
