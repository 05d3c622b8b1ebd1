"""Offline throughput of llmserve against `transformers` generate and CTranslate2, same weights, one run.

Builds the bench model (configs/bench.yaml's dummy_config) with `transformers`,
saves it as a checkpoint, then measures in this one run:
  * llmserve through its real master/agent path (OfflineEngine: all requests
    submitted at once), `transformers` generate in static batches, and
    CTranslate2 (float32 and int8, when `ctranslate2` is installed) in batches;
  * batch-1 decode ms/token and time to first token for each.
Prints a table, writes JSON to --out, and with --update-benchmarks replaces the
table between the bench_offline markers in BENCHMARKS.md.

    llmserve bench offline --update-benchmarks      # or: python tools/bench_offline.py --update-benchmarks
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from typing import Optional

import torch
import transformers
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.common.config import load_config, packaged_config  # noqa: E402
from llmserve.common.sampling import SamplingParams  # noqa: E402
from llmserve.master.offline import OfflineEngine  # noqa: E402
from llmserve.tools.local_config import write_local_config  # noqa: E402

MARK_START, MARK_END = "<!-- bench_offline:start -->", "<!-- bench_offline:end -->"


def save_checkpoint(dummy_config: dict, path: str, seed: int) -> transformers.PreTrainedModel:
    """The reference model with random weights, saved where llmserve will load it from."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in dummy_config.items() if k != "architectures"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    model.generation_config.eos_token_id = None  # exact output lengths on both sides
    model.save_pretrained(path, safe_serialization=True)
    return model


async def measure_llmserve(config_path: str, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    async with OfflineEngine(load_config(config_path)) as llm:
        await llm.generate(prompts[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        outputs = await llm.generate(prompts, params)
        wall = time.perf_counter() - start
        (alone,) = await llm.generate(prompts[:1], params)
    decode_ms = (alone.res_time - alone.first_token_time) / (output_len - 1) * 1e3
    return {
        "wall_s": wall,
        "tokens_per_s": len(prompts) * output_len / wall,
        "batch1_decode_ms": decode_ms,
        "batch1_ttft_ms": alone.first_token_time * 1e3,
        "first_output": outputs[0].output_ids,
    }


@torch.inference_mode()
def hf_generate(model, input_ids: torch.Tensor, output_len: int) -> torch.Tensor:
    return model.generate(
        input_ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0
    )[:, input_ids.shape[1]:]


def measure_transformers(model, prompts: torch.Tensor, output_len: int, batch_sizes: list[int]) -> dict:
    hf_generate(model, prompts[:2], 4)  # warm-up
    results = {}
    first_output = None
    for batch_size in batch_sizes:
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            out = hf_generate(model, prompts[i : i + batch_size], output_len)
            if i == 0:
                first_output = out[0].tolist()
        wall = time.perf_counter() - start
        results[batch_size] = {"wall_s": wall, "tokens_per_s": len(prompts) * output_len / wall}
    start = time.perf_counter()
    hf_generate(model, prompts[:1], 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    hf_generate(model, prompts[:1], output_len)
    full = time.perf_counter() - start
    return {
        "static": results,
        "batch1_ttft_ms": ttft * 1e3,
        "batch1_decode_ms": (full - ttft) / (output_len - 1) * 1e3,
        "first_output": first_output,
    }


def save_vocabulary(path: str, vocab_size: int) -> None:
    """A word-level tokenizer whose tokens are t0..tN: CTranslate2's converter reads the vocabulary from it."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(path)


def measure_ctranslate2(model_dir: str, prompts: torch.Tensor, output_len: int, compute_type: str, batch_size: int) -> dict:
    """CTranslate2's Generator on the same checkpoint, converted to `compute_type`, in batches of `batch_size`."""
    import ctranslate2

    converted = os.path.join(model_dir, f"ct2-{compute_type}")
    if not os.path.exists(converted):
        ctranslate2.converters.TransformersConverter(model_dir).convert(converted, quantization=compute_type)
    generator = ctranslate2.Generator(converted, device="cpu", intra_threads=torch.get_num_threads())
    tokens = [[f"t{i}" for i in row] for row in prompts.tolist()]

    def generate(batch: list[list[str]], length: int) -> list[list[int]]:
        results = generator.generate_batch(batch, max_length=length, min_length=length, sampling_topk=1,
                                           include_prompt_in_result=False, max_batch_size=batch_size)
        return [result.sequences_ids[0] for result in results]

    generate(tokens[:2], 4)  # warm-up
    start = time.perf_counter()
    outputs = generate(tokens, output_len)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    generate(tokens[:1], 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    generate(tokens[:1], output_len)
    full = time.perf_counter() - start
    return {"wall_s": wall, "tokens_per_s": len(prompts) * output_len / wall, "batch1_ttft_ms": ttft * 1e3,
            "batch1_decode_ms": (full - ttft) / (output_len - 1) * 1e3, "first_output": outputs[0],
            "batch_size": batch_size}


def _quantized(args) -> str:
    if args.quantization == "none":
        return ""
    return f" ({args.quantization}{', LM head too' if args.quantize_lm_head else ''})"


def table(ours: dict, ref: dict, peers: dict, args) -> str:
    best_bs = max(ref["static"], key=lambda bs: ref["static"][bs]["tokens_per_s"])
    best = ref["static"][best_bs]["tokens_per_s"]
    rows = [
        "| run | output tok/s | wall s | llmserve / this |",
        "|---|---|---|---|",
        f"| llmserve{_quantized(args)}, all {args.num_requests} at once (continuous batching) | {ours['tokens_per_s']:.1f} "
        f"| {ours['wall_s']:.1f} | 1.00 |",
    ]
    for bs, r in ref["static"].items():
        rows.append(
            f"| transformers generate, static batches of {bs} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | "
            f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f} |"
        )
    for name, r in peers.items():
        rows.append(f"| CTranslate2 {name}, batches of {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | "
                    f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f} |")
    others = {"transformers": ref, **{f"CTranslate2 {name}": r for name, r in peers.items()}}
    rows += [
        "",
        f"| batch 1 | llmserve{_quantized(args)} | " + " | ".join(others) + " |",
        "|---|---|" + "---|" * len(others),
        f"| decode ms/token | {ours['batch1_decode_ms']:.2f} | "
        + " | ".join(f"{r['batch1_decode_ms']:.2f}" for r in others.values()) + " |",
        f"| time to first token ms ({args.input_len} prompt tokens) | {ours['batch1_ttft_ms']:.1f} | "
        + " | ".join(f"{r['batch1_ttft_ms']:.1f}" for r in others.values()) + " |",
        "",
        f"Throughput ratio llmserve / best transformers static batch ({best_bs}): "
        f"**{ours['tokens_per_s'] / best:.2f}x**. First request's greedy tokens equal between the two: "
        f"{ours['first_output'] == ref['first_output']}.",
    ]
    return "\n".join(rows)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def update_benchmarks(text: str, path: str) -> None:
    """Replace the table between the markers in `path`, or append it (to a new file if need be)."""
    content = ""
    if os.path.exists(path):
        with open(path) as f:
            content = f.read()
    block = f"{MARK_START}\n{text}\n{MARK_END}"
    if MARK_START in content:
        before, rest = content.split(MARK_START, 1)
        content = before + block + rest.split(MARK_END, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n## Offline throughput against transformers\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(content)


def parse_args(argv: Optional[list[str]], prog: Optional[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=packaged_config("bench.yaml"), help="config whose dummy_config is the model")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--ctranslate2", nargs="*", default=["float32", "int8"], metavar="COMPUTE_TYPE",
                        help="CTranslate2 runs beside (when installed); none with an empty list")
    parser.add_argument("--ct2-batch-size", type=int, default=32)
    parser.add_argument("--quantization", choices=["none", "int8", "int4"], default="none",
                        help="llmserve's model_config.quantization (the peers keep their own settings)")
    parser.add_argument("--quantize-lm-head", action="store_true", help="llmserve's model_config.quantize_lm_head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("results", "bench_offline.json"), help="JSON results file")
    parser.add_argument("--update-benchmarks", nargs="?", const="BENCHMARKS.md", metavar="FILE",
                        help="write the table into FILE (default BENCHMARKS.md, in the current directory)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """`llmserve bench offline`: measure both, print the table, write the JSON (and BENCHMARKS.md when asked)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    with open(args.config) as f:
        dummy_config = yaml.safe_load(f)["model_config"]["dummy_config"]
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, dummy_config["vocab_size"], (args.num_requests, args.input_len), generator=generator)
    with tempfile.TemporaryDirectory() as workdir:
        model = save_checkpoint(dummy_config, os.path.join(workdir, "model"), args.seed)
        checkpoint = {"model_path": os.path.join(workdir, "model"), "load_format": "auto", "dummy_config": None,
                      "quantization": args.quantization, "quantize_lm_head": args.quantize_lm_head}
        config_path = write_local_config(args.config, workdir, model_config=checkpoint)
        ours = asyncio.run(measure_llmserve(config_path, prompts.tolist(), args.output_len))
        print(f"llmserve: {ours['tokens_per_s']:.1f} tok/s", flush=True)
        ref = measure_transformers(model, prompts, args.output_len, args.hf_batch_sizes)
        peers = {}
        if args.ctranslate2 and importlib.util.find_spec("ctranslate2") is not None:
            save_vocabulary(os.path.join(workdir, "model"), dummy_config["vocab_size"])
            for compute_type in args.ctranslate2:
                peers[compute_type] = measure_ctranslate2(
                    os.path.join(workdir, "model"), prompts, args.output_len, compute_type, args.ct2_batch_size
                )
                print(f"CTranslate2 {compute_type}: {peers[compute_type]['tokens_per_s']:.1f} tok/s", flush=True)
    command = f"{prog or 'python tools/bench_offline.py'} " + " ".join(argv)
    text = (
        f"Machine: {machine()}. Workload: {args.num_requests} requests of {args.input_len} random prompt tokens, "
        f"exactly {args.output_len} output tokens each, greedy, float32, same weights.\n"
        f"Command: `{command.strip()}`\n\n" + table(ours, ref, peers, args)
    )
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"llmserve": ours, "transformers": ref, "ctranslate2": peers, "machine": machine()}, f, indent=2)
    if args.update_benchmarks:
        update_benchmarks(text, args.update_benchmarks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
