"""Quantized linear layers (model_config.quantization, or a pre-quantized checkpoint), one module swap per scheme.

The model is built and loaded in its float dtype with Hugging Face names (tensor-parallel shards
included); `quantize_model` then replaces each decoder nn.Linear by its quantized form, as gpt-fast
does, and the float weights go. The LM head and the embedding keep the model dtype.

int8 (W8A8): weights symmetric per output channel, activations quantized per token at run time
(scale = max |x| / 127, round half to even); integer products summed exactly, both scales applied to
the output. Kernels, chosen once per CPU (`Int8Plan`):
  * llmserve's int8 kernel (agent/kernels/gemv.cpp; `llmserve build-kernels`): int8 widened to int16,
    pairs multiplied and summed into int32 (vpmaddwd), weights streamed once per 64 rows; any row count;
  * oneDNN's int8 GEMM through vLLM's compiled ops (agent/cpu_ops.py): taken above GEMV_MAX_ROWS rows
    where the CPU has VNNI (4 products per int32 lane and instruction);
  * the same arithmetic in torch (slow: a reference, not a serving path), with a warning.
Without VNNI, oneDNN's int8 products go through vpmaddubsw, which adds pairs of u8 x s8 products into a
saturating int16: with 8-bit weights the sums clip (a 14% error measured on an AVX2 CPU). Where oneDNN
must serve such a CPU (llmserve's kernels not built), the weights get 7 bits (|q| <= 63), whose pair
sums always fit, as fbgemm's reduce_range does.

int4 (weight-only, groups of `quantization_group_size` along K): w = q * scale + min, q in 0..15, per output
channel and group; at load time min and scale span each group's range (as llama.cpp's q4_1 and gpt-fast do);
GPTQ and AWQ checkpoints bring their own (min = -zero * scale). llmserve's int4 kernel (agent/kernels/int4.cpp)
quantizes the activations to int8 per row and group, as llama.cpp pairs 4-bit weights with 8-bit
activations, and sums the integer products exactly; without it, the same arithmetic in torch (slow).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from llmserve.agent import cpu_ops, kernels
from llmserve.agent.layers import swap_modules
from llmserve.agent.layers.linear import GEMV_MAX_ROWS

logger = logging.getLogger("llmserve.agent")

SCHEMES = ("none", "int8", "int4")
INT4_UNIT = 64  # weights per 32 packed bytes in int4.cpp: group sizes are multiples of it
ONEDNN_PRIMITIVE_CACHE = 128  # oneDNN primitives kept per layer (one per distinct row count)


@dataclass(frozen=True)
class CheckpointGrid:
    """A pre-quantized checkpoint's grid for one weight [N, K], riding on the weight after it is dequantized
    to float (so tensor parallelism shards it beside the weight) until the layer rounds it back, exactly.
    int8: `scales` [N]. int4: `scales` and integer `zeros` [N, groups] (w = (q - zero) * scale) and, for
    GPTQ's act-order (desc_act), `g_idx` [K], the group of each input channel."""

    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None
    g_idx: Optional[torch.Tensor] = None


def checkpoint_grid(linear: nn.Linear) -> Optional[CheckpointGrid]:
    return getattr(linear.weight, "checkpoint_grid", None)


def merged_grid(grids: list[Optional[CheckpointGrid]]) -> Optional[CheckpointGrid]:
    """The grid of layers merged side by side (their rows concatenated); None unless all have one."""
    if any(grid is None for grid in grids):
        return None
    first = grids[0]
    if any((grid.g_idx is None) != (first.g_idx is None) or (grid.g_idx is not None and not torch.equal(grid.g_idx, first.g_idx))
           for grid in grids):
        raise ValueError("layers that share their input (q/k/v, gate/up) have different act-order group indices")
    zeros = None if first.zeros is None else torch.cat([grid.zeros for grid in grids])
    return CheckpointGrid(torch.cat([grid.scales for grid in grids]), zeros, first.g_idx)


@dataclass(frozen=True)
class Int8Plan:
    """Which kernel computes up to GEMV_MAX_ROWS rows and which above (llmserve, onednn or torch), and the
    weights' range."""

    small: str
    large: str
    weight_max: int

    @property
    def description(self) -> str:
        bits = "8-bit" if self.weight_max == 127 else "7-bit (oneDNN without VNNI)"
        return f"int8 W8A8 ({self.small} <= {GEMV_MAX_ROWS} rows, {self.large} above; {bits} weights)"

    def layer(self, linear: nn.Linear) -> nn.Module:
        return Int8Linear(linear, self)


def int8_plan(has_onednn: bool, has_llmserve: bool, has_vnni: bool) -> Int8Plan:
    large = "onednn" if has_onednn and (has_vnni or not has_llmserve) else "llmserve" if has_llmserve else "torch"
    small = "llmserve" if has_llmserve else large
    return Int8Plan(small, large, 63 if large == "onednn" and not has_vnni else 127)


def quantize_per_channel(
    weight: torch.Tensor, limit: int = 127, scales: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel, |q| <= limit: (qweight int8 [N, K], scales float32 [N]); weight ~ qweight * scales.
    `scales` given (a pre-quantized checkpoint's): rounded on that grid instead of each channel's max |w| / limit."""
    scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / limit if scales is None else scales.float()
    qweight = torch.round(weight.float() / scales[:, None]).clamp(-limit, limit).to(torch.int8)
    return qweight, scales


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x [M, K]: (x_q int8 [M, K], scales float32 [M, 1])."""
    scales = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x.float() / scales).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = dequant(quant_token(x) @ quant_channel(W)^T) + b, by the plan's kernels."""

    def __init__(self, linear: nn.Linear, plan: Int8Plan):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        self.plan = plan
        grid = checkpoint_grid(linear)  # a pre-quantized checkpoint: its own int8 values
        given = None if grid is None else grid.scales
        qweight, scales = quantize_per_channel(linear.weight.detach(), plan.weight_max,
                                               given if plan.weight_max == 127 else None)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        # float32 for llmserve's kernel and the reference; oneDNN reads the bias in the output's dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.onednn_bias = None if linear.bias is None else linear.bias.detach().to(self.out_dtype)
        self.handler: Optional[torch.Tensor] = None
        if "onednn" in (plan.small, plan.large):
            # oneDNN packs the [K, N] weight into its own blocked layout once; the handle lives as long as this
            self.handler = torch.tensor(cpu_ops.load().ops.create_onednn_scaled_mm_handler(
                qweight.t(), scales, self.out_dtype, True, False, ONEDNN_PRIMITIVE_CACHE
            ), dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        kernel = self.plan.small if len(rows) <= GEMV_MAX_ROWS else self.plan.large
        if kernel == "llmserve":
            out = torch.ops.llmserve.int8_gemv(rows.float(), self.qweight, self.scales, self.bias).to(self.out_dtype)
        elif kernel == "onednn":
            ops = cpu_ops.load().ops
            x_q = torch.empty(rows.shape, dtype=torch.int8)
            x_scales = torch.empty((len(rows), 1), dtype=torch.float32)
            ops.dynamic_scaled_int8_quant(x_q, rows.contiguous(), x_scales, None)
            out = torch.empty((len(rows), self.out_features), dtype=self.out_dtype)
            ops.onednn_scaled_mm(out, x_q, x_scales, None, None, self.onednn_bias, self.handler)
        else:
            out = self._reference(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def _reference(self, rows: torch.Tensor) -> torch.Tensor:
        """The same arithmetic in torch: integer products summed in float64 (exact), then both scales."""
        x_q, x_scales = quantize_per_token(rows)
        out = (x_q.double() @ self.qweight.double().t()) * x_scales.double() * self.scales.double()
        if self.bias is not None:
            out = out + self.bias.double()
        return out.to(self.out_dtype)


@dataclass(frozen=True)
class Int4Plan:
    """int4 weight-only: llmserve's kernel or torch's reference; `group_size` for weights quantized here."""

    kernel: str
    group_size: Optional[int]  # None: only the groups a pre-quantized checkpoint brings

    @property
    def description(self) -> str:
        groups = f", groups of {self.group_size}" if self.group_size else ""
        return f"int4 weight-only{groups} ({self.kernel}; int8 activations per group)"

    def layer(self, linear: nn.Linear) -> nn.Module:
        return Int4Linear(linear, self.group_size, self.kernel)


def quantize_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's range in 16 steps: (q uint8 [N, K] in 0..15, scales, mins float32 [N, K / group_size]);
    weight ~ q * scale + min, within scale / 2."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(out_features, in_features), scales, low


def grid_groupwise(weight: torch.Tensor, grid: CheckpointGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A checkpoint's 4-bit values back from its dequantized weight (columns in `grid`'s group order):
    (q, scales, mins) as quantize_groupwise gives them."""
    out_features, in_features = weight.shape
    groups = grid.scales.shape[1]
    expand = (out_features, groups, in_features // groups)
    scales, zeros = grid.scales.float()[..., None].expand(expand), grid.zeros.float()[..., None].expand(expand)
    q = torch.round(weight.float().reshape(expand) / scales + zeros).clamp(0, 15).to(torch.uint8)
    return q.reshape(out_features, in_features), grid.scales.float(), -grid.zeros.float() * grid.scales.float()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> [N, K / 2] bytes, int4.cpp's order: in every 64 weights, byte j holds weight j
    (low nibble) and weight j + 32 (high)."""
    units = q.reshape(q.shape[0], -1, 2, INT4_UNIT // 2)
    return (units[:, :, 0] | (units[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def group_order(grid: Optional[CheckpointGrid], in_features: int) -> Optional[torch.Tensor]:
    """The input channels in group order for act-order (desc_act) checkpoints, whose groups are scattered
    along K; None when they are contiguous already. ValueError when the groups are not all one size
    (desc_act's row-parallel layers split over tensor-parallel ranks)."""
    if grid is None or grid.g_idx is None:
        return None
    g_idx = grid.g_idx.long()
    groups = grid.scales.shape[1]
    order = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[order], torch.arange(in_features) // (in_features // groups)):
        raise ValueError("an act-order (desc_act) GPTQ layer whose groups are not all the same size: "
                         "with tensor parallelism its row-parallel layers cannot be split; use tensor_parallel 1")
    return None if torch.equal(order, torch.arange(in_features)) else order


class Int4Linear(nn.Module):
    """y = x W^T + b with W = q * scale + min in groups along K; activations int8 per row and group."""

    def __init__(self, linear: nn.Linear, group_size: int, kernel: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        self.kernel = kernel
        grid = checkpoint_grid(linear)
        weight = linear.weight.detach()
        self.order = group_order(grid, self.in_features)
        if self.order is not None:
            weight = weight[:, self.order]
        if grid is None:
            if self.in_features % group_size:
                raise ValueError(f"quantization_group_size {group_size} does not divide a layer's {self.in_features} inputs")
            q, scales, mins = quantize_groupwise(weight, group_size)
        else:
            q, scales, mins = grid_groupwise(weight, grid)
        self.group_size = self.in_features // scales.shape[1]
        if self.group_size % INT4_UNIT:
            raise ValueError(f"int4 groups of {self.group_size} inputs: llmserve's int4 kernel takes groups of a "
                             f"multiple of {INT4_UNIT}")
        self.register_buffer("qweight", pack_int4(q))
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        if self.order is not None:
            rows = rows.index_select(1, self.order)
        if self.kernel == "llmserve":
            out = torch.ops.llmserve.int4_gemm(rows, self.qweight, self.scales, self.mins, self.group_size, self.bias)
        else:
            out = self._reference(rows)
        return out.to(self.out_dtype).view(*x.shape[:-1], self.out_features)

    def unpacked(self) -> torch.Tensor:
        """q [N, K] (columns in group order), as the layer was built from."""
        units = self.qweight.reshape(self.out_features, -1, INT4_UNIT // 2)
        return torch.stack((units & 15, units >> 4), dim=2).reshape(self.out_features, self.in_features)

    def _reference(self, rows: torch.Tensor) -> torch.Tensor:
        """The kernel's arithmetic in torch: activations int8 per row and group, integer dots exact in float64."""
        groups = self.scales.shape[1]
        x_q, x_scales = quantize_per_token(rows.reshape(-1, self.group_size))  # each group of each row
        x_q, x_scales = x_q.view(len(rows), groups, self.group_size).double(), x_scales.view(len(rows), groups)
        q = self.unpacked().reshape(self.out_features, groups, self.group_size).double()
        dots = torch.einsum("mgk,ngk->mng", x_q, q)
        out = (dots * (x_scales.double()[:, None, :] * self.scales.double()[None])).sum(dim=2)
        out += (x_q.sum(dim=2) * x_scales.double()) @ self.mins.double().t()
        if self.bias is not None:
            out += self.bias.double()
        return out.float()


def quantization_plan(
    scheme: str, dtype: torch.dtype, device: torch.device, group_size: Optional[int] = 128
) -> Union[Int8Plan, Int4Plan]:
    """The kernels `scheme` runs with here; ValueError where it cannot run."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if device.type != "cpu":
        raise ValueError(f"quantization: {scheme} runs on the CPU, not {device.type}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"quantization: {scheme} takes a float32 or bfloat16 model, not {dtype}")
    built = kernels.load()
    if scheme == "int4":
        if isinstance(built, kernels.Unavailable):
            logger.warning("quantization int4: torch's reference arithmetic, slow (%s)", built.reason)
            return Int4Plan("torch", group_size)
        return Int4Plan("llmserve", group_size)
    onednn = cpu_ops.load()
    plan = int8_plan(not isinstance(onednn, cpu_ops.Unavailable), not isinstance(built, kernels.Unavailable),
                     torch.cpu._is_vnni_supported())
    if "torch" in (plan.small, plan.large):
        logger.warning("quantization int8: torch's reference arithmetic, slow (%s; %s)",
                       getattr(built, "reason", "built"), getattr(onednn, "reason", "loaded"))
    return plan


def quantize_model(
    model: nn.Module, plan: Union[Int8Plan, Int4Plan], keep: tuple[str, ...] = ("lm_head",), prequantized_only: bool = False
) -> int:
    """Swap every nn.Linear of `model` but those named in `keep` for the plan's quantized layer, or with
    `prequantized_only` exactly the layers a pre-quantized checkpoint stored quantized; how many were swapped."""

    def replacement(name: str, child: nn.Module) -> Optional[nn.Module]:
        if type(child) is not nn.Linear:
            return None
        chosen = checkpoint_grid(child) is not None if prequantized_only else name not in keep
        return plan.layer(child) if chosen else None

    return swap_modules(model, replacement)
