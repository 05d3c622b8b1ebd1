"""Pre-quantized checkpoints' linear layers read as float weights, each with the grid it was rounded on.

Every quantized layer comes out as its dequantized `weight` (so tensor parallelism shards it as any other
and the model loads by Hugging Face names), its grid kept aside; agent/layers/quantization rounds the
weight back onto that grid, which gives the checkpoint's own integers exactly. The on-disk layouts:

* compressed-tensors int8 (W8A8): `weight` int8 [N, K], `weight_scale` [N, 1]; W = q * scale.
* GPTQ (4-bit): `qweight` int32 [K / 8, N], eight inputs per word, lowest nibble first; `qzeros` int32
  [groups, N / 8], eight outputs per word; `scales` [groups, N]; `g_idx` [K] the group of each input
  (act-order, desc_act: scattered; otherwise k // group_size, and not needed). W = (q - zero) * scale.
  The first format (checkpoint_format gptq) stores each zero point less one, modulo 16.
* AWQ (GEMM): `qweight` int32 [K, N / 8] and `qzeros` int32 [groups, N / 8], eight outputs per word in
  the interleaved order 0 2 4 6 1 3 5 7 (nibble i holds output AWQ_ORDER[i]); `scales` [groups, N].
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from llmserve.agent.layers.quantization import CheckpointGrid
from llmserve.common.model_info import CheckpointQuantization

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def dequantized(
    weights: Iterator[tuple[str, torch.Tensor]], spec: CheckpointQuantization, grids: dict[str, CheckpointGrid]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each quantized layer's parts replaced by its float `weight` (its grid
    put in `grids` under the weight's name); the parts of a layer may come in any order, from any file."""
    parts, dequantize = FORMATS[spec.method]
    parts = (*parts, "g_idx") if spec.desc_act else parts
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, suffix = name.rpartition(".")
        if _skipped(name, suffix, tensor, spec):
            continue
        if suffix not in parts or (suffix == "weight" and tensor.dtype != torch.int8):  # a float layer
            yield name, tensor
            continue
        layer = pending.setdefault(prefix, {})
        layer[suffix] = tensor
        if len(layer) == len(parts):
            del pending[prefix]
            weight, grids[f"{prefix}.weight"] = dequantize(prefix, layer, spec)
            yield f"{prefix}.weight", weight
    if pending:
        missing = [f"{prefix} lacks {', '.join(sorted(set(parts) - set(layer)))}" for prefix, layer in sorted(pending.items())]
        raise ValueError(f"the checkpoint's quantized layers are incomplete ({spec.method}): {'; '.join(missing[:3])}")


def _skipped(name: str, suffix: str, tensor: torch.Tensor, spec: CheckpointQuantization) -> bool:
    if suffix == "weight_zero_point":  # compressed-tensors' symmetric schemes: zeros, when a writer stores them
        if bool(tensor.any()):
            raise ValueError(f"{name}: non-zero zero points (an asymmetric scheme); llmserve loads symmetric int8")
        return True
    return suffix == "g_idx" and not spec.desc_act  # k // group_size: the contiguous groups the scales say


def _compressed_tensors(prefix: str, layer: dict, spec: CheckpointQuantization) -> tuple[torch.Tensor, CheckpointGrid]:
    qweight, scale = layer["weight"], layer["weight_scale"].float().reshape(-1)
    if scale.numel() != qweight.shape[0]:
        raise ValueError(f"{prefix}.weight: int8 [out, in] with one scale per output channel expected, got "
                         f"{list(qweight.shape)} and {scale.numel()} scales")
    return qweight.float() * scale[:, None], CheckpointGrid(scale)


def _gptq(prefix: str, layer: dict, spec: CheckpointQuantization) -> tuple[torch.Tensor, CheckpointGrid]:
    q = unpack_nibbles(layer["qweight"].t()).t()  # [K, N]
    scales = layer["scales"].float()
    zeros = (unpack_nibbles(layer["qzeros"])[:, : q.shape[1]] + spec.zero_offset) % 16
    g_idx = layer["g_idx"].long() if spec.desc_act else None
    return _four_bit_weight(prefix, q, zeros, scales, g_idx)


def _awq(prefix: str, layer: dict, spec: CheckpointQuantization) -> tuple[torch.Tensor, CheckpointGrid]:
    q = unpack_nibbles(layer["qweight"], AWQ_ORDER)  # [K, N]
    zeros = unpack_nibbles(layer["qzeros"], AWQ_ORDER)[:, : q.shape[1]]
    return _four_bit_weight(prefix, q, zeros, layer["scales"].float(), None)


def _four_bit_weight(
    prefix: str, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None
) -> tuple[torch.Tensor, CheckpointGrid]:
    """W [N, K] = (q - zero) * scale from q [K, N] and zeros, scales [groups, N]."""
    in_features, groups = q.shape[0], scales.shape[0]
    if scales.shape[1] != q.shape[1] or zeros.shape != scales.shape or in_features % groups:
        raise ValueError(f"{prefix}: {groups} groups of scales {list(scales.shape)} and zeros {list(zeros.shape)} "
                         f"do not fit {in_features} inputs x {q.shape[1]} outputs")
    group_of = g_idx if g_idx is not None else torch.arange(in_features) // (in_features // groups)
    if g_idx is not None and (len(g_idx) != in_features or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"{prefix}.g_idx: {len(g_idx)} group indices for {in_features} inputs and {groups} groups")
    weight = (q.float() - zeros.float()[group_of]) * scales[group_of]
    return weight.t().contiguous(), CheckpointGrid(scales.t().contiguous(), zeros.float().t().contiguous(), g_idx)


def unpack_nibbles(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 [R, C] of eight 4-bit values each, lowest nibble first, nibble i holding column order[i] of its
    eight -> int32 [R, 8 * C]."""
    nibbles = (packed.to(torch.int32)[..., None] >> NIBBLE_SHIFTS) & 15
    columns = torch.empty_like(nibbles)
    columns[..., list(order)] = nibbles
    return columns.reshape(packed.shape[0], -1)


FORMATS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "compressed-tensors": (("weight", "weight_scale"), _compressed_tensors),
    "gptq": (("qweight", "qzeros", "scales"), _gptq),
    "awq": (("qweight", "qzeros", "scales"), _awq),
}
