"""The GPU check of the kernels issue, as one script for a machine with a CUDA device.

1. The model and attention tests on the GPU (LLMSERVE_TEST_DEVICE=cuda: the agent side runs there).
2. Decode ms/token of a Llama-3-8B-shaped model (dummy weights, bfloat16) at batch 1 and 64 through the
   model runner (no server), against the weight-streaming floor (16 GB / the device's bandwidth;
   3.3 ms on an H200 at 4.8 TB/s).

    python tools/bench_gpu.py --out results/gpu.json      # a few minutes; needs ~20 GB of GPU memory
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
}
BLOCK_SIZE = 16
CONTEXT = 512  # tokens each sequence holds while decoding


def run_tests() -> int:
    env = {**os.environ, "LLMSERVE_TEST_DEVICE": "cuda"}
    tests = ["tests/integration/test_model_logits.py", "tests/integration/test_attention_backends.py"]
    return subprocess.call([sys.executable, "-m", "pytest", "-q", *tests], cwd=ROOT, env=env)


def decode_ms(batch: int, steps: int = 30) -> float:
    import torch

    from llmserve.agent.model_runner import ModelRunner

    blocks_per_seq = CONTEXT // BLOCK_SIZE + 1
    runner = ModelRunner(LLAMA3_8B, None, "dummy", "bfloat16", "cuda", batch * blocks_per_seq, BLOCK_SIZE)
    block_tables = np.arange(batch * blocks_per_seq, dtype=np.int32).reshape(batch, blocks_per_seq)
    positions = np.full(batch, CONTEXT - 1, dtype=np.int64)
    slots = block_tables[:, positions[0] // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + positions[0] % BLOCK_SIZE
    args = (np.ones(batch, dtype=np.int64), positions, slots, np.ones(batch, dtype=np.int32),
            np.full(batch, CONTEXT, dtype=np.int32), block_tables, np.arange(batch, dtype=np.int64))
    times = []
    for step in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        runner.execute(*args)
        torch.cuda.synchronize()
        if step >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    del runner
    torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--bandwidth-tb-s", type=float, default=4.8, help="the device's memory bandwidth (H200: 4.8)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "gpu.json"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here")
    results = {"device": torch.cuda.get_device_name(), "tests_exit_code": None if args.skip_tests else run_tests()}
    weight_bytes = 2 * (32 * (4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336) + 2 * 128256 * 4096)
    results["floor_ms"] = weight_bytes / (args.bandwidth_tb_s * 1e12) * 1e3
    for batch in (1, 64):
        results[f"decode_ms_batch{batch}"] = decode_ms(batch)
        print(f"batch {batch}: {results[f'decode_ms_batch{batch}']:.2f} ms/step (floor {results['floor_ms']:.2f} ms)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
