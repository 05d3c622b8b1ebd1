"""How far quantization moves a model's next-token distributions, as llama.cpp's `perplexity --kl-divergence` reports it.

Builds the config's model twice on the CPU, in float and with each quantization scheme asked, runs the same
token sequences (random ids, or --text: consecutive windows of a text file in the model's tokenizer) through
one prefill on both and compares the logits at every position: the absolute
error, the KL divergence of the quantized distribution from the float one (mean, 99th percentile, max) and how
often the most likely token stays the same. Logit error alone says little (adding a constant to every logit
changes nothing a sampler sees); KL and top-1 agreement are what generation feels. The reference's mean entropy
says whether there is anything to disturb: random weights at the default initializer_range (0.02) give nearly
uniform distributions (entropy close to ln(vocab)), so pass a larger --initializer-range to a dummy model,
or better, a trained checkpoint (--model-path, e.g. tools/train_tiny.py's) and real text.
Prints one markdown row per scheme and appends one JSON line per scheme to --results.

    python tools/quant_accuracy.py --config configs/bench.yaml --quantization int8 int4 --initializer-range 0.1
    python tools/quant_accuracy.py --model-path results/tiny-llama --text results/tiny-llama/heldout.txt
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmserve.agent.model_runner import ModelRunner  # noqa: E402
from llmserve.common.config import Config, load_config, packaged_config  # noqa: E402
from llmserve.common.errors import ConfigError  # noqa: E402
from llmserve.common.model_info import read_hf_config  # noqa: E402
from llmserve.master.tokenizer import load_tokenizer  # noqa: E402

BLOCK_SIZE = 16
HEADER = ("| model | scheme | max abs err | mean abs err | KL mean | KL p99 | KL max | top-1 agreement | ref entropy |\n"
          "|---|---|---|---|---|---|---|---|---|")


def position_errors(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position errors of `candidate` against `reference` logits [positions, vocab], in float64."""
    reference, candidate = reference.double(), candidate.double()
    ref_logp, cand_logp = torch.log_softmax(reference, dim=-1), torch.log_softmax(candidate, dim=-1)
    ref_p = ref_logp.exp()
    abs_error = (candidate - reference).abs()
    return {
        "kl": (ref_p * (ref_logp - cand_logp)).sum(dim=-1),  # KL(P_ref || P_cand)
        "top1_equal": reference.argmax(dim=-1) == candidate.argmax(dim=-1),
        "ref_entropy": -(ref_p * ref_logp).sum(dim=-1),
        "mean_abs_error": abs_error.mean(dim=-1),  # every row has `vocab` entries: the mean of means is the mean
        "max_abs_error": abs_error.amax(dim=-1),
    }


def summarize(errors: list[dict[str, torch.Tensor]]) -> dict:
    """The metrics over every position of `errors` (position_errors of one or more sequences)."""
    joined = {name: torch.cat([e[name] for e in errors]) for name in errors[0]}
    kl = joined["kl"]
    return {
        "max_abs_error": joined["max_abs_error"].max().item(),
        "mean_abs_error": joined["mean_abs_error"].mean().item(),
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "kl_max": kl.max().item(),
        "top1_agreement": joined["top1_equal"].double().mean().item(),
        "ref_entropy_mean": joined["ref_entropy"].mean().item(),
        "positions": kl.numel(),
    }


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """How far `candidate` logits [positions, vocab] are from `reference`: abs error, KL, top-1 agreement."""
    return summarize([position_errors(reference, candidate)])


def build_runner(config: Config, hf_config: dict, length: int, quantization: str = "none",
                 quantize_lm_head: bool = False, group_size: int = 128) -> ModelRunner:
    """The config's model on the CPU with a KV cache for one sequence of `length` tokens."""
    model = config.model_config
    return ModelRunner(hf_config, model.model_path, model.load_format, model.model_dtype, "cpu",
                       math.ceil(length / BLOCK_SIZE), BLOCK_SIZE, seed=model.seed,
                       attention_backend=model.attention_backend, linear_kernel=model.linear_kernel,
                       max_seq_len=length, quantization=quantization, quantize_lm_head=quantize_lm_head,
                       quantization_group_size=group_size)


def prefill_logits(runner: ModelRunner, token_ids: torch.Tensor) -> torch.Tensor:
    """Logits [len(token_ids), vocab] of one prefill of `token_ids` into blocks 0, 1, ...: every position."""
    n = len(token_ids)
    positions = np.arange(n, dtype=np.int64)
    blocks = np.arange(math.ceil(n / BLOCK_SIZE), dtype=np.int32)
    lens = np.array([n], dtype=np.int32)
    # block b holds positions 16b..16b+15, so a position's slot is the position itself
    return runner.execute(token_ids.numpy(), positions, positions, lens, lens, blocks[None, :], positions)


def measure(reference: ModelRunner, candidate: ModelRunner, sequences: torch.Tensor) -> dict:
    """compare_logits over every position of `sequences` [n, length], one sequence at a time."""
    return summarize([position_errors(prefill_logits(reference, ids), prefill_logits(candidate, ids))
                      for ids in sequences])


def with_model_path(config: Config, model_path: str) -> Config:
    """`config` with its model loaded from the checkpoint in `model_path` (load_format auto, its own tokenizer)."""
    model = dataclasses.replace(config.model_config, model_path=model_path, load_format="auto", dummy_config=None,
                                tokenizer_path=None)
    if not os.path.isdir(model_path):
        raise ConfigError(f"--model-path: {model_path} is not a directory")
    model.validate()
    return dataclasses.replace(config, model_config=model)


def text_windows(token_ids: list[int], num_windows: int, length: int) -> torch.Tensor:
    """The first `num_windows` consecutive non-overlapping windows of `length` ids: [num_windows, length]."""
    needed = num_windows * length
    if len(token_ids) < needed:
        raise ValueError(f"{len(token_ids)} tokens are fewer than {num_windows} windows of {length} ({needed})")
    return torch.tensor(token_ids[:needed], dtype=torch.long).view(num_windows, length)


def text_sequences(config: Config, path: str, num_windows: int, length: int) -> torch.Tensor:
    """Windows (text_windows) of the text file at `path` in the model's tokenizer, without special tokens."""
    with open(path, encoding="utf-8") as f:
        token_ids = load_tokenizer(config.model_config).encode(f.read(), add_special_tokens=False).ids
    try:
        return text_windows(token_ids, num_windows, length)
    except ValueError as exc:
        raise SystemExit(f"--text {path}: {exc}; pass a longer file or fewer --sequences / a smaller --length") from None


def input_sequences(args: argparse.Namespace, config: Config, vocab_size: int) -> torch.Tensor:
    """--text's windows, else random ids past the special ones (seeded by --seed): [--sequences, --length]."""
    if args.text is not None:
        return text_sequences(config, args.text, args.sequences, args.length)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(3, vocab_size, (args.sequences, args.length), generator=generator)


def model_label(config: Config, hf_config: dict) -> str:
    """The checkpoint's directory name, or the dummy model's shape and initializer range."""
    model = config.model_config
    if model.load_format != "dummy":
        return os.path.basename(os.path.normpath(model.model_path))
    return (f"dummy h{hf_config['hidden_size']} x{hf_config['num_hidden_layers']} v{hf_config['vocab_size']} "
            f"init {hf_config.get('initializer_range', 0.02)}")


def scheme_label(scheme: str, group_size: int, quantize_lm_head: bool) -> str:
    return scheme + (f" g{group_size}" if scheme == "int4" else "") + (" + LM head" if quantize_lm_head else "")


def table_row(model: str, scheme: str, m: dict) -> str:
    return (f"| {model} | {scheme} | {m['max_abs_error']:.4g} | {m['mean_abs_error']:.4g} | {m['kl_mean']:.3g} | "
            f"{m['kl_p99']:.3g} | {m['kl_max']:.3g} | {m['top1_agreement']:.4f} | {m['ref_entropy_mean']:.3f} |")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=packaged_config("bench.yaml"), help="config whose model_config is the model")
    parser.add_argument("--model-path", default=None,
                        help="a checkpoint directory to use instead of the config's model (load_format auto)")
    parser.add_argument("--text", default=None,
                        help="take the sequences from this text file in the model's tokenizer, not random ids")
    parser.add_argument("--quantization", nargs="+", choices=["none", "int8", "int4"], default=["int8", "int4"],
                        help="schemes to compare with the float model (none: a check that the runs repeat)")
    parser.add_argument("--quantize-lm-head", action="store_true", help="quantize the LM head too (or the config's)")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size (default: the config's)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--initializer-range", type=float, default=None,
                        help="dummy weights' standard deviation (dummy_config.initializer_range, default 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids (without --text)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--results", default=os.path.join("results", "quant_accuracy.jsonl"), help="JSON lines appended")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Build the float model once, compare each scheme with it, print the rows and append the JSON lines."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    if args.model_path is not None:
        config = with_model_path(config, args.model_path)
    hf_config = read_hf_config(config.model_config)
    if args.initializer_range is not None:
        if config.model_config.load_format != "dummy":
            raise SystemExit("--initializer-range: only for load_format dummy (a checkpoint brings its weights)")
        hf_config["initializer_range"] = args.initializer_range
    group_size = args.group_size or config.model_config.quantization_group_size
    lm_head = args.quantize_lm_head or config.model_config.quantize_lm_head
    reference = build_runner(config, hf_config, args.length)
    sequences = input_sequences(args, config, reference.vocab_size)
    model = model_label(config, hf_config)
    print(HEADER, flush=True)
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    for scheme in args.quantization:
        candidate = build_runner(config, hf_config, args.length, scheme, lm_head, group_size)
        metrics = measure(reference, candidate, sequences)
        label = scheme_label(scheme, group_size, lm_head)
        print(table_row(model, label, metrics), flush=True)
        record = {"config": args.config, "model": model, "scheme": label, "quantization": candidate.quantization,
                  "text": args.text, "sequences": args.sequences, "length": args.length, "seed": args.seed,
                  "vocab_size": reference.vocab_size, "threads": torch.get_num_threads(), **metrics}
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")
        del candidate
    print(f"\nref entropy: nats per position; ln(vocab) = {math.log(reference.vocab_size):.3f} is a uniform distribution.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
