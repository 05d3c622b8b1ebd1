"""Weights quantized at load time (model_config.quantization), one linear-module swap per scheme.

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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmserve.agent import cpu_ops, kernels
from llmserve.agent.layers import swap_modules
from llmserve.agent.layers.linear import GEMV_MAX_ROWS

logger = logging.getLogger("llmserve.agent")

SCHEMES = ("none", "int8")
ONEDNN_PRIMITIVE_CACHE = 128  # oneDNN primitives kept per layer (one per distinct row count)


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
        given = getattr(linear.weight, "checkpoint_scales", None)  # a pre-quantized checkpoint: its own int8 values
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


def quantization_plan(scheme: str, dtype: torch.dtype, device: torch.device) -> Int8Plan:
    """The kernels `scheme` runs with here; ValueError where it cannot run."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if device.type != "cpu":
        raise ValueError(f"quantization: {scheme} runs on the CPU, not {device.type}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"quantization: {scheme} takes a float32 or bfloat16 model, not {dtype}")
    onednn, built = cpu_ops.load(), kernels.load()
    plan = int8_plan(not isinstance(onednn, cpu_ops.Unavailable), not isinstance(built, kernels.Unavailable),
                     torch.cpu._is_vnni_supported())
    if "torch" in (plan.small, plan.large):
        logger.warning("quantization int8: torch's reference arithmetic, slow (%s; %s)",
                       getattr(built, "reason", "built"), getattr(onednn, "reason", "loaded"))
    return plan


def quantize_model(
    model: nn.Module, plan: Int8Plan, keep: tuple[str, ...] = ("lm_head",), prequantized_only: bool = False
) -> int:
    """Swap every nn.Linear of `model` but those named in `keep` for Int8Linear, or with `prequantized_only`
    exactly the layers a pre-quantized checkpoint stored in int8; how many were swapped."""

    def replacement(name: str, child: nn.Module) -> Optional[nn.Module]:
        if type(child) is not nn.Linear:
            return None
        chosen = hasattr(child.weight, "checkpoint_scales") if prequantized_only else name not in keep
        return Int8Linear(child, plan) if chosen else None

    return swap_modules(model, replacement)
