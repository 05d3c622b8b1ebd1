"""Megatron-style tensor parallelism: which slice of each weight a rank holds, and the all-reduces that join them.

Attention heads and KV heads are split across ranks (column-parallel q/k/v and
gate/up, row-parallel o and down, an all-reduce of their outputs); the
embedding, the norms and the LM head are replicated. With more ranks than KV
heads each KV head is replicated on `world / num_kv_heads` ranks. Biases of the
row-parallel layers are kept on rank 0 only, so the all-reduce adds them once.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llmserve.agent.layers.quantization import CheckpointGrid
from llmserve.common.shm import SharedArrays

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


def shard_grid(weight_name: str, grid: CheckpointGrid, hf_config: dict, shard: Shard) -> CheckpointGrid:
    """The part of a pre-quantized weight's grid this rank holds: scales and zeros follow the output rows of
    column-parallel layers, and the groups along the inputs of row-parallel ones (act-order's group index
    follows the inputs, its groups stay whole)."""
    if shard.world == 1:
        return grid
    if COLUMN_PARALLEL.search(weight_name):
        rows = (None if t is None else _rows(weight_name, t, hf_config, shard).clone() for t in (grid.scales, grid.zeros))
        return CheckpointGrid(*rows, grid.g_idx)
    if not ROW_PARALLEL.search(weight_name) or grid.zeros is None:  # int8: one scale per output channel
        return grid
    if grid.g_idx is not None:
        return CheckpointGrid(grid.scales, grid.zeros, grid.g_idx.chunk(shard.world)[shard.rank].clone())
    groups = grid.scales.shape[1]
    if groups == 1:  # per channel: the one group spans every rank's inputs
        return grid
    if groups % shard.world:
        raise ValueError(f"{weight_name}: {groups} quantization groups along the inputs do not split over {shard.world} ranks")
    return CheckpointGrid(*(t.chunk(shard.world, dim=1)[shard.rank].clone() for t in (grid.scales, grid.zeros)))


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


def add_all_reduces(model: nn.Module, timer: AllReduceTimer, all_reduce: Callable[[torch.Tensor], None]) -> None:
    """Sum the outputs of every row-parallel layer across the ranks, timing each sum."""

    def reduce_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        all_reduce(output)
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


def can_share_memory(device: str, transport: str) -> bool:
    """Ranks on one host's CPUs can sum through shared memory (x86's store order keeps the flag after the data)."""
    return device == "cpu" and transport == "shm" and platform.machine().lower() in ("x86_64", "amd64")


SLOW_PEER_SLEEP_S = 1e-4


class SharedMemoryAllReduce:
    """All-reduce of the ranks of one host through one shared segment: a few microseconds instead of gloo's socket
    round trips (each a context switch on a busy CPU).

    Each rank copies its tensor into its slot, raises its flag to the call's generation and waits for every
    flag; then every rank sums the slots in the same order, so all get the same bits. Two buffers alternate:
    a rank that runs ahead writes the other one, and cannot lap a rank still reading, since it waited for
    that rank's flag of the call in between.
    """

    FLAG_STRIDE = 8  # one 64-byte line per flag

    def __init__(self, shard: Shard, max_elements: int, dtype: torch.dtype, timeout_s: float):
        self.rank, self.world = shard.rank, shard.world
        element = torch.empty((), dtype=dtype).element_size()
        layout = [("flags", np.int64, self.world * self.FLAG_STRIDE), ("data", np.uint8, 2 * self.world * max_elements * element)]
        self.segment = _shared_segment(shard, layout)
        self.flags = self.segment.arrays["flags"][:: self.FLAG_STRIDE]
        self.data = torch.frombuffer(self.segment.arrays["data"], dtype=dtype).view(2, self.world, max_elements)
        self.generation = 0
        self.timeout_s = timeout_s

    def __call__(self, tensor: torch.Tensor) -> None:
        self.generation += 1
        flat = tensor.view(-1)
        slots = self.data[self.generation % 2, :, : flat.numel()]
        slots[self.rank].copy_(flat)
        self.flags[self.rank] = self.generation
        self._wait_for_all()
        torch.sum(slots, dim=0, out=flat)

    def _wait_for_all(self) -> None:
        spins, started = 0, None
        while self.flags.min() < self.generation:
            spins += 1
            if spins <= 64:
                continue
            started = started or time.monotonic()
            waited = time.monotonic() - started
            if waited > self.timeout_s:
                raise RuntimeError(f"rank {self.rank}: another rank did not reach the all-reduce in {self.timeout_s} s")
            if waited > 1e-3:  # a rank stalled this long is not worth a spinning core
                time.sleep(SLOW_PEER_SLEEP_S)
            else:  # let the other rank have the core
                os.sched_yield()

    def close(self) -> None:
        self.data = None
        self.segment.close()


def _shared_segment(shard: Shard, layout: list) -> SharedArrays:
    """Rank 0 creates the segment and names it to the others; it is unlinked once all have it mapped, so it
    disappears with the processes however they end."""
    if shard.rank == 0:
        segment = SharedArrays.create("allreduce", layout)
        names = [segment.name]
    else:
        names = [None]
    dist.broadcast_object_list(names, src=0)
    if shard.rank != 0:
        segment = SharedArrays.attach(names[0], layout)
    dist.barrier()
    if shard.rank == 0:
        segment.unlink()
    return segment
