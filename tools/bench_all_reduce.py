"""All-reduce latency between two one-thread CPU ranks: gloo against the shared-memory all-reduce the agents use.

    python tools/bench_all_reduce.py --calls 2000

(mp.spawn shares one resource tracker between the two ranks, which may print a KeyError
about the segment at exit; the servers' agents are separate processes and do not.)
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.agent.tensor_parallel import Shard, SharedMemoryAllReduce, init_group  # noqa: E402

SIZES = (768, 16 * 768)  # one token and sixteen tokens of the bench model's hidden state


def latencies_us(all_reduce, tensor: torch.Tensor, calls: int) -> list[float]:
    for _ in range(50):
        all_reduce(tensor)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        all_reduce(tensor)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def rank_main(rank: int, port: int, calls: int) -> None:
    torch.set_num_threads(1)
    shard = Shard(rank, 2)
    init_group("gloo", "127.0.0.1", port, shard, 60)
    shared = SharedMemoryAllReduce(shard, max(SIZES), torch.float32, 60)
    for size in SIZES:
        for name, all_reduce in (("gloo", dist.all_reduce), ("shared memory", shared)):
            times = sorted(latencies_us(all_reduce, torch.randn(size), calls))
            if rank == 0:
                print(f"{size:6d} floats  {name:<14} median {statistics.median(times):8.1f} us  "
                      f"p90 {times[int(0.9 * len(times))]:8.1f} us")
    shared.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(rank_main, args=(port, args.calls), nprocs=2)


if __name__ == "__main__":
    main()
