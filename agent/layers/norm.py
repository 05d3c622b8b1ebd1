"""RMSNorm: scale each hidden vector by its root mean square; with a residual, add it first (one fused step)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from llmserve.agent import cpu_ops


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned per-channel gain.

    `forward(x)` is norm(x); `forward(x, residual)` is (norm(x + residual), x + residual): the pre-norm
    block's residual add and the next norm in one step.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return self._norm(hidden)
        residual = hidden + residual
        return self._norm(residual), residual

    def _norm(self, hidden: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the gain, as the reference does, so half dtypes match it.
        hidden_fp32 = hidden.float()
        variance = hidden_fp32.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_fp32 * torch.rsqrt(variance + self.eps)).to(hidden.dtype)


class CpuRMSNorm(RMSNorm):
    """The same with vLLM's CPU kernels: one pass each, the residual form in place."""

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        ops = cpu_ops.load().ops
        if residual is None:
            out = torch.empty_like(hidden)
            ops.rms_norm(out, hidden.contiguous(), self.weight, self.eps)
            return out
        hidden = hidden.contiguous()  # the kernel writes norm(hidden + residual) over hidden, the sum over residual
        ops.fused_add_rms_norm(hidden, residual, self.weight, self.eps)
        return hidden, residual
