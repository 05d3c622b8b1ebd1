"""SiLU gating of the Llama MLP: silu(gate) * up, from the merged gate_up projection's output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.agent import cpu_ops


class SiluAndMul(nn.Module):
    """x [..., 2 * d] holding gate then up -> silu(gate) * up [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuSiluAndMul(SiluAndMul):
    """The same in one pass, with vLLM's CPU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
        cpu_ops.load().ops.silu_and_mul(out, x)
        return out
