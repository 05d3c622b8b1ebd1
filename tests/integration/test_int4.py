"""int4 weights (model_config.quantization: int4) and 4-bit GPTQ / AWQ checkpoints.

The checkpoints are packed here, by this file's own writers of each format's documented on-disk layout
(AutoGPTQ's `qweight`/`qzeros`/`scales`/`g_idx`, AutoAWQ's GEMM packing), from known float matrices; the
loaded layers must hold exactly the written 4-bit values and compute what the dequantized weights compute
(in transformers, for whole models)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llmserve.agent import kernels
from llmserve.agent.layers.quantization import Int4Linear, quantize_groupwise
from llmserve.agent.loader import load_model
from llmserve.agent.model_runner import ModelRunner
from llmserve.agent.tensor_parallel import Shard
from llmserve.common.config import ConfigError, config_from_dict
from llmserve.common.model_info import check_tensor_parallel, checkpoint_quantization
from tests.integration.test_quantization import prefill_logits, write_checkpoint_pair

HAS_LLMSERVE = not isinstance(kernels.load(), kernels.Unavailable)
KERNELS = [pytest.param("llmserve", marks=pytest.mark.skipif(not HAS_LLMSERVE, reason="no llmserve kernels")), "torch"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds output column AWQ_ORDER[i] of its eight


def linear(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 3.0, out_features)[:, None])
    return layer


def test_groups_round_to_the_nearest_of_16_steps_between_their_ends():
    weight = linear(256, 24, False, seed=0).weight.detach()
    q, scales, mins = quantize_groupwise(weight, 64)
    assert q.dtype == torch.uint8 and scales.shape == mins.shape == (24, 4)
    assert int(q.max()) == 15 and int(q.min()) == 0
    dequantized = q.float().view(24, 4, 64) * scales[..., None] + mins[..., None]
    assert bool(((weight.view(24, 4, 64) - dequantized).abs() <= scales[..., None] / 2 + 1e-6).all())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 70])
@pytest.mark.parametrize("group_size, bias", [(64, True), (128, False), (384, True)])
def test_the_int4_layer_computes_its_own_arithmetic_exactly(kernel, rows, group_size, bias):
    float_layer = linear(384, 72, bias, seed=rows)
    layer = Int4Linear(float_layer, group_size, kernel)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(1))
    groups = 384 // group_size
    parts = x.view(rows, groups, group_size)  # activations: int8 per row and group
    x_scales = parts.abs().amax(dim=2, keepdim=True) / 127
    x_q = torch.round(parts / x_scales).clamp(-127, 127)
    weight = layer.unpacked().double().view(72, groups, group_size) * layer.scales.double()[..., None] + layer.mins.double()[..., None]
    expected = torch.einsum("mgk,ngk->mn", (x_q * x_scales).double(), weight)
    if bias:
        expected += float_layer.bias.detach().double()
    got = layer(x).double()
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, atol=1e-6, rtol=0)
    relative = float((got - float_layer(x).detach()).norm() / expected.norm())
    assert relative < 0.1  # 16 steps per group


def test_a_group_size_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="quantization_group_size 128 does not divide a layer's 192 inputs"):
        Int4Linear(linear(192, 8, False, seed=0), 128, "torch")
    with pytest.raises(ConfigError, match="quantization_group_size: 96 is not a positive multiple of 64"):
        config_from_dict({"model_config": {"load_format": "dummy", "dummy_config": {}, "quantization": "int4",
                                           "quantization_group_size": 96}})


# ---------------------------------------------------------------- writers of the checkpoint formats


def pack_words(values: np.ndarray, axis: int, order: list[int] = list(range(8))) -> np.ndarray:
    """Eight 4-bit values per int32 along `axis`, nibble i (bits 4i..4i+3) holding value order[i] of the eight."""
    values = np.moveaxis(values.astype(np.uint32), axis, -1)
    eights = values.reshape(*values.shape[:-1], -1, 8)
    words = np.zeros(eights.shape[:-1], dtype=np.uint32)
    for i, column in enumerate(order):
        words |= eights[..., column] << np.uint32(4 * i)
    return np.moveaxis(words.view(np.int32), -1, axis)


def gptq_layer(weight: torch.Tensor, group_size: int, sym: bool, desc_act: bool, v1: bool, seed: int):
    """AutoGPTQ's tensors for W [N, K] and (q [N, K], W as they dequantize)."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    if desc_act:  # act-order: channels taken in a (here random) order, groups formed along it
        order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_features) // size).int()
    else:
        g_idx = (torch.arange(in_features) // size).int()
    groups = in_features // size
    scales, zeros = torch.zeros(groups, out_features), torch.zeros(groups, out_features)
    for g in range(groups):
        part = weight[:, g_idx == g]
        low, high = part.amin(dim=1).clamp(max=0), part.amax(dim=1).clamp(min=0)
        if sym:
            high = torch.maximum(-low, high)
            scales[g], zeros[g] = (2 * high / 15).half().float(), 8
        else:
            scales[g] = ((high - low) / 15).half().float()
            zeros[g] = torch.round(-low / scales[g]).clamp(0, 15)
    s, z = scales[g_idx.long()].t(), zeros[g_idx.long()].t()  # [N, K]
    q = (torch.round(weight / s) + z).clamp(0, 15)
    stored_zeros = ((zeros - 1) % 16 if v1 else zeros).numpy().astype(np.uint32)
    tensors = {
        "qweight": torch.from_numpy(pack_words(q.t().numpy(), axis=0)),
        "qzeros": torch.from_numpy(pack_words(stored_zeros, axis=1)),
        "scales": scales.half(),
        "g_idx": g_idx,
    }
    return tensors, q.to(torch.uint8), (q - z) * s


def awq_layer(weight: torch.Tensor, group_size: int):
    """AutoAWQ's GEMM tensors for W [N, K] and (q [N, K], W as they dequantize)."""
    out_features, in_features = weight.shape
    parts = weight.view(out_features, in_features // group_size, group_size)
    low, high = parts.amin(dim=2), parts.amax(dim=2)
    scales = ((high - low).clamp(min=1e-5) / 15).half().float()  # [N, groups]
    zeros = torch.round(-low / scales).clamp(0, 15)
    q = (torch.round(parts / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    dequantized = ((q - zeros[..., None]) * scales[..., None]).view(out_features, in_features)
    tensors = {
        "qweight": torch.from_numpy(pack_words(q.view(out_features, in_features).t().numpy(), axis=1, order=AWQ_ORDER)),
        "qzeros": torch.from_numpy(pack_words(zeros.t().numpy(), axis=1, order=AWQ_ORDER)),
        "scales": scales.t().contiguous().half(),
    }
    return tensors, q.view(out_features, in_features).to(torch.uint8), dequantized


FORMATS = {  # name -> (quantization_config, writer of one layer)
    "gptq-sym-g128": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
                      lambda w, seed: gptq_layer(w, 128, True, False, True, seed)),
    "gptq-asym-g64-act-order": ({"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False},
                                lambda w, seed: gptq_layer(w, 64, False, True, True, seed)),
    "gptq-v2-per-channel": ({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": True,
                             "checkpoint_format": "gptq_v2"}, lambda w, seed: gptq_layer(w, -1, True, False, False, seed)),
    "awq-g64": ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
                lambda w, seed: awq_layer(w, 64)),
}


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> str:
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1)  # sharper next-token distributions than the default's
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("float")
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module", params=list(FORMATS))
def packed(request, float_checkpoint, tmp_path_factory):
    """(format, the packed checkpoint, the same weights dequantized as a float checkpoint, {weight: q [N, K]})."""
    quantization_config, write = FORMATS[request.param]
    weights = load_file(f"{float_checkpoint}/model.safetensors")
    packed_weights, dequantized, written = {}, {}, {}
    for name, tensor in sorted(weights.items()):
        if any(f".{p}.weight" in name for p in PROJECTIONS):
            # layers that read the same input get one act order (GPTQ orders by that input's statistics)
            shared_input = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            tensors, q, dequantized[name] = write(tensor, sorted(weights).index(shared_input))
            prefix = name[: -len(".weight")]
            packed_weights.update({f"{prefix}.{part}": value.contiguous() for part, value in tensors.items()})
            written[name] = q
        else:
            packed_weights[name] = dequantized[name] = tensor
    paths = write_checkpoint_pair(float_checkpoint, packed_weights, quantization_config, dequantized, tmp_path_factory,
                                  request.param)
    return request.param, paths[0], paths[1], written


def hf_config_of(path: str) -> dict:
    with open(f"{path}/config.json") as f:
        return json.load(f)


def test_a_packed_checkpoint_is_loaded_with_its_own_4_bit_values_and_computes_as_its_dequantized_weights(packed):
    name, path, dequantized_path, written = packed
    runner = ModelRunner(hf_config_of(path), path, "auto", "float32", "cpu", 8, 16)
    assert runner.kernels["quantization"].startswith("int4 weight-only (")
    assert "8 layers from the checkpoint" in runner.kernels["quantization"]
    layer = runner.model.model.layers[1]
    for module, parts in ((layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                          (layer.mlp.down_proj, ("mlp.down_proj",))):
        assert isinstance(module, Int4Linear)
        q = torch.cat([written[f"model.layers.1.{part}.weight"] for part in parts])
        if module.order is not None:  # act-order: the layer keeps its inputs in group order
            q = q[:, module.order]
        assert torch.equal(module.unpacked(), q)
    reference = LlamaForCausalLM.from_pretrained(dequantized_path, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]
    got = prefill_logits(runner, tokens)
    assert float((got - expected).norm() / expected.norm()) < 0.05, name  # only the activations' int8 rounding
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.9


def test_tensor_parallel_ranks_together_compute_the_whole_layer(packed):
    name, path, _, _ = packed
    hf_config = hf_config_of(path)
    if checkpoint_quantization(hf_config).desc_act:
        with pytest.raises(ValueError, match="act-order .* serve it with one"):
            check_tensor_parallel(hf_config, 2)
        return
    models = [load_model(hf_config, path, "auto", torch.float32, torch.device("cpu"), shard=Shard(rank, world))
              for rank, world in ((0, 1), (0, 2), (1, 2))]
    whole, *ranks = [model.model.layers[0] for model in models]
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    # row-parallel down_proj: each rank's share of the inputs, the outputs summed (the all-reduce)
    full = Int4Linear(whole.mlp.down_proj, 128, "torch")(x)
    summed = sum(Int4Linear(rank.mlp.down_proj, 128, "torch")(part) for rank, part in zip(ranks, x.chunk(2, dim=1)))
    scale = full.abs().max()
    tolerance = 1e-5 if name != "gptq-v2-per-channel" else 0.02  # one group over all inputs: rounded per rank
    torch.testing.assert_close(summed / scale, full / scale, atol=tolerance, rtol=0)
    # column-parallel q_proj: each rank's output rows
    x = x[:, :128]
    full = Int4Linear(whole.self_attn.q_proj, 128, "torch")(x)
    joined = torch.cat([Int4Linear(rank.self_attn.q_proj, 128, "torch")(x) for rank in ranks], dim=1)
    torch.testing.assert_close(joined, full, atol=1e-5, rtol=0)


def test_the_int4_model_stays_close_to_the_float_model(float_checkpoint):
    hf_config = hf_config_of(float_checkpoint)
    float_runner = ModelRunner(hf_config, float_checkpoint, "auto", "float32", "cpu", 8, 16)
    runner = ModelRunner(hf_config, float_checkpoint, "auto", "float32", "cpu", 8, 16, quantization="int4",
                         quantization_group_size=64)
    assert runner.kernels["quantization"].startswith("int4 weight-only, groups of 64")
    assert not isinstance(runner.model.lm_head, Int4Linear)
    tokens = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    expected, got = prefill_logits(float_runner, tokens), prefill_logits(runner, tokens)
    # random weights are chaotic and 16 steps a group are coarse: measured 0.36 and KL 0.08; a broken kernel is far off
    assert float((got - expected).norm() / expected.norm()) < 0.5
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) < 0.2


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq with bits 8"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"quant_method": "awq", "w_bit": 4, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 3}, "awq with bits 3"),
])
def test_a_4_bit_checkpoint_llmserve_cannot_read_is_refused_naming_what(config, message):
    with pytest.raises(ConfigError, match=message):
        checkpoint_quantization({"quantization_config": config})


def test_gptq_groups_of_32_are_refused_at_load(float_checkpoint, tmp_path):
    weights = load_file(f"{float_checkpoint}/model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors, _, _ = gptq_layer(weights[name], 32, True, False, True, seed=0)
    linear_layer = nn.Linear(128, 128, bias=False)
    from llmserve.agent.quantized_checkpoint import dequantized

    spec = checkpoint_quantization({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}})
    grids: dict = {}
    ((_, weight),) = dequantized(iter((f"o.{part}", value) for part, value in tensors.items()), spec, grids)
    linear_layer.weight = nn.Parameter(weight, requires_grad=False)
    linear_layer.weight.checkpoint_grid = grids["o.weight"]
    with pytest.raises(ValueError, match="groups of 32 inputs: llmserve's int4 kernel takes groups of a multiple of 64"):
        Int4Linear(linear_layer, 128, "torch")


def test_weights_quantized_at_load_split_over_ranks_compute_the_whole_layer(float_checkpoint):
    hf_config = hf_config_of(float_checkpoint)
    models = [load_model(hf_config, float_checkpoint, "auto", torch.float32, torch.device("cpu"), shard=Shard(rank, world))
              for rank, world in ((0, 1), (0, 2), (1, 2))]
    whole, *ranks = [model.model.layers[1].mlp.down_proj for model in models]
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7))
    full = Int4Linear(whole, 64, "torch")(x)  # each rank's inputs are whole groups: the same groups, the same grid
    summed = sum(Int4Linear(rank, 64, "torch")(part) for rank, part in zip(ranks, x.chunk(2, dim=1)))
    torch.testing.assert_close(summed / full.abs().max(), full / full.abs().max(), atol=1e-5, rtol=0)
