"""Train a tiny Llama from scratch on this repository's own text, for tools that need a model that predicts something.

Random weights give nearly uniform next-token distributions, so a quantization accuracy check on them measures
little (tools/quant_accuracy.py). With no downloads possible, this trains a small `transformers`
LlamaForCausalLM on the repository's *.md and *.py files (sorted, so the corpus is the same for the same tree)
tokenized with llmserve's builtin tokenizer, for --minutes of wall time or --steps steps, and saves a
self-contained checkpoint: config.json, model.safetensors, generation_config.json, tokenizer.json, plus
heldout.txt, the last --heldout fraction of the token stream decoded back to text, which training never saw.

    python tools/train_tiny.py --minutes 4 --out results/tiny-llama
    python tools/quant_accuracy.py --model-path results/tiny-llama --text results/tiny-llama/heldout.txt
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from llmserve.master.tokenizer import build_builtin_tokenizer  # noqa: E402

SKIPPED_DIRS = {".venv", "results"}  # and every hidden directory
SUFFIXES = (".md", ".py")
LOG_EVERY = 20


def corpus_files(root: str) -> list[str]:
    """The *.md and *.py files under `root`, outside .venv, results and hidden directories, sorted."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        files += [os.path.join(directory, n) for n in names if n.endswith(SUFFIXES)]
    return sorted(files)


def token_stream(tokenizer: Tokenizer, files: list[str]) -> torch.Tensor:
    """Every file's token ids between the tokenizer's bos and eos (where it has them), one after another."""
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    ids: list[int] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        body = tokenizer.encode(text, add_special_tokens=False).ids
        ids += ([bos] if bos is not None else []) + body + ([eos] if eos is not None else [])
    return torch.tensor(ids, dtype=torch.long)


def split_stream(stream: torch.Tensor, heldout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the last `heldout` fraction of `stream`."""
    cut = len(stream) - int(len(stream) * heldout)
    return stream[:cut], stream[cut:]


def model_config(args: argparse.Namespace, tokenizer: Tokenizer) -> LlamaConfig:
    """The Llama shape the arguments ask for, with the tokenizer's vocabulary and special ids."""
    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=args.max_positions, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tokenizer.token_to_id("<s>"),
        eos_token_id=tokenizer.token_to_id("</s>"), pad_token_id=None,
    )


def random_batch(train: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` windows of `length` tokens from `train` at random offsets: [batch, length]."""
    starts = torch.randint(0, len(train) - length, (batch,), generator=generator)
    return torch.stack([train[s:s + length] for s in starts.tolist()])


def lr_scale(step: int, progress: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `floor` as `progress` goes from 0 to 1."""
    cosine = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return min(1.0, (step + 1) / warmup) * cosine


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, heldout: torch.Tensor, length: int, batch: int) -> float:
    """Mean next-token loss (nats) over consecutive non-overlapping `length`-token windows of `heldout`."""
    model.eval()
    windows = heldout[: len(heldout) // length * length].view(-1, length)
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        loss = model(input_ids=chunk, labels=chunk).loss  # mean over chunk's (length - 1) * rows predictions
        total, count = total + loss.item() * chunk.numel(), count + chunk.numel()
    model.train()
    return total / count


def train(model: LlamaForCausalLM, train_ids: torch.Tensor, args: argparse.Namespace) -> tuple[int, float]:
    """Train until --steps steps or --minutes have passed; (steps taken, mean loss of the last LOG_EVERY)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    budget_s, start, recent, step = args.minutes * 60, time.monotonic(), [], 0
    model.train()
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0:
            return step, sum(recent) / max(len(recent), 1)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_scale(step, progress, args.warmup)
        ids = random_batch(train_ids, args.batch, args.length, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-LOG_EVERY:]
        step += 1
        if step % LOG_EVERY == 0:
            print(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{time.monotonic() - start:6.1f} s", flush=True)


def save(model: LlamaForCausalLM, tokenizer: Tokenizer, heldout: torch.Tensor, out: str) -> None:
    """The checkpoint, its tokenizer.json and heldout.txt (the held-out ids decoded) in `out`."""
    os.makedirs(out, exist_ok=True)
    config = model.config
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(tokenizer.decode(heldout.tolist(), skip_special_tokens=False))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("results", "tiny-llama"), help="checkpoint directory")
    parser.add_argument("--root", default=ROOT, help="directory whose *.md and *.py files are the corpus")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall time to train (unless --steps)")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of --minutes")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=20, help="warmup steps")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--heldout", type=float, default=0.05, help="fraction of the token stream held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Build the corpus, train, report the losses and save the checkpoint."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_builtin_tokenizer()
    files = corpus_files(args.root)
    train_ids, heldout_ids = split_stream(token_stream(tokenizer, files), args.heldout)
    print(f"corpus: {len(files)} files, {len(train_ids)} train + {len(heldout_ids)} held-out tokens, "
          f"vocab {tokenizer.get_vocab_size()}", flush=True)
    model = LlamaForCausalLM(model_config(args, tokenizer)).float()
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    start = time.monotonic()
    steps, train_loss = train(model, train_ids, args)
    wall_s = time.monotonic() - start
    held = heldout_loss(model, heldout_ids, args.length, args.batch)
    save(model, tokenizer, heldout_ids, args.out)
    print(f"\n{steps} steps in {wall_s:.0f} s; train loss {train_loss:.4f}, held-out loss {held:.4f} nats/token "
          f"(uniform: {math.log(tokenizer.get_vocab_size()):.4f})\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
