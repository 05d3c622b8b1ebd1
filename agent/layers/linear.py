"""Kernels of the linear layers, chosen once at load time.

The model is built and loaded with nn.Linear (Hugging Face weight names, tensor-parallel sharding);
`use_linear_kernel` then swaps each for the chosen kernel's module, as gpt-fast swaps in quantized
ones, keeping the one float weight. On the CPU (float32): up to GEMV_MAX_ROWS rows (decode steps),
llmserve's GEMV kernel streams the weights at the memory's speed (agent/kernels/gemv.cpp); above,
oneDNN's matmul, 2-2.7x faster than MKL's sgemm on the AMD CPUs measured here (BENCHMARKS.md).
Elsewhere, `torch` keeps F.linear.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from llmserve.agent import kernels
from llmserve.agent.layers import swap_modules

logger = logging.getLogger("llmserve.agent")

KERNELS = ("auto", "cpu", "torch")
GEMV_MAX_ROWS = 8  # the rows gemv.cpp takes (a decode step verifying up to 7 speculative tokens); above, oneDNN's blocked matmul


class CpuLinear(nn.Module):
    """y = x W^T + b: llmserve's GEMV for a few rows, oneDNN's matmul for more."""

    def __init__(self, linear: nn.Linear, has_gemv: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.max_gemv_rows = GEMV_MAX_ROWS if has_gemv else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if len(rows) <= self.max_gemv_rows:
            out = torch.ops.llmserve.gemv(rows, self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [None], "")
        return out.view(*x.shape[:-1], self.out_features)


def linear_kernel(name: str, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """(the kernel `name` asks for, a description of it): `auto` takes cpu where it runs, else torch.
    ValueError if a named kernel cannot run here."""
    if name not in KERNELS:
        raise ValueError(f"linear_kernel: {name!r} is not one of {', '.join(KERNELS)}")
    problem = _cpu_unsupported(dtype, device)
    if name == "cpu" and problem:
        raise ValueError(f"linear_kernel: cpu cannot run here: {problem}")
    if name == "torch" or problem:
        return "torch", "torch (F.linear)" + (f"; cpu kernels: {problem}" if problem and name == "auto" else "")
    gemv = kernels.load()
    if isinstance(gemv, kernels.Unavailable):
        logger.warning("linear layers: oneDNN only, no GEMV kernel for decode steps: %s", gemv.reason)
        return "cpu", "onednn (no gemv: llmserve build-kernels)"
    return "cpu", f"gemv (llmserve {gemv.variant}) <= {GEMV_MAX_ROWS} rows, onednn above"


def use_linear_kernel(model: nn.Module, kernel: str) -> None:
    """Swap every nn.Linear of `model` for `kernel`'s module (nothing to do for torch)."""
    if kernel == "torch":
        return
    has_gemv = not isinstance(kernels.load(), kernels.Unavailable)
    swap_modules(model, lambda name, child: CpuLinear(child, has_gemv) if type(child) is nn.Linear else None)


def _cpu_unsupported(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"they are for the CPU, not {device.type}"
    if dtype != torch.float32:
        return f"float32 only, not {dtype}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return f"this torch ({torch.__version__}) has no oneDNN linear"
    return None
