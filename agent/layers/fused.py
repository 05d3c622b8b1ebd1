"""The small layers' kernels, chosen once at load time: vLLM's fused CPU kernels where they run, else torch.

RMSNorm (with the residual add fused in), the MLP's SiLU gating and the rotary embedding are a dozen
small torch ops per layer; on the CPU each becomes one pass of vLLM's compiled kernels (agent/cpu_ops.py).
The swap keeps every parameter: the layers differ only in how they compute.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llmserve.agent import cpu_ops
from llmserve.agent.layers import swap_modules
from llmserve.agent.layers.activation import CpuSiluAndMul, SiluAndMul
from llmserve.agent.layers.norm import CpuRMSNorm, RMSNorm
from llmserve.agent.layers.rotary import CpuRotaryEmbedding, RotaryEmbedding

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_kernels_unsupported(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the fused CPU kernels cannot run here, or None."""
    return cpu_ops.unsupported(dtype, device, DTYPES)


def use_fused_kernels(model: nn.Module, max_positions: int, dtype: torch.dtype) -> None:
    """Swap the model's RMSNorm, SiluAndMul and RotaryEmbedding modules for their fused CPU forms."""
    swap_modules(model, lambda name, child: _fused(child, max_positions, dtype))


def _fused(child: nn.Module, max_positions: int, dtype: torch.dtype) -> Optional[nn.Module]:
    if type(child) is RMSNorm:
        fused = CpuRMSNorm(child.weight.shape[0], child.eps)
        fused.weight = child.weight
        return fused
    if type(child) is SiluAndMul:
        return CpuSiluAndMul()
    if type(child) is RotaryEmbedding:
        return CpuRotaryEmbedding(child, max_positions, dtype)
    return None
