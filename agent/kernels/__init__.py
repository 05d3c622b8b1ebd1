"""llmserve's own compiled CPU kernels (the C++ files beside this one), built by the install step, loaded by ISA.

Each source is compiled twice, for AVX2 + FMA and for AVX-512, into the user's cache
($XDG_CACHE_HOME/llmserve/kernels/<torch version>-<hash of the sources and flags>/), by
`llmserve build-kernels` (which `make install` runs). An agent loads the build for its CPU and
never compiles: without one it falls back to oneDNN / torch and says how to build it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Optional, Union

import torch

logger = logging.getLogger("llmserve.agent")

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("gemv.cpp", "attention.cpp", "int4.cpp")
HEADERS = ("simd.h", "bias.h")  # included by the sources: part of what a build is keyed by
VARIANTS = {  # the ISA an agent's CPU reports -> the compiler flags of its build
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"),
    "avx2": ("-mavx2", "-mfma"),
}
COMMON_FLAGS = ("-O3", "-fopenmp")


@dataclass(frozen=True)
class Kernels:
    """The loaded build: its ops are torch.ops.llmserve.*."""

    variant: str
    path: str


@dataclass(frozen=True)
class Unavailable:
    reason: str


def variant_for_this_cpu() -> Optional[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability)


def build_directory(variant: str) -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    digest.update(" ".join((*COMMON_FLAGS, *VARIANTS[variant])).encode())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "llmserve", "kernels", f"torch{torch.__version__}-{digest.hexdigest()[:16]}", variant)


def library_path(variant: str) -> str:
    """Where the build of `variant` for these sources and this torch lives."""
    return os.path.join(build_directory(variant), f"llmserve_kernels_{variant}.so")


@functools.lru_cache(maxsize=1)
def load() -> Union[Kernels, Unavailable]:
    """This CPU's build, loaded once; or why there is none."""
    variant = variant_for_this_cpu()
    if variant is None:
        return Unavailable(f"no build for this CPU ({torch.backends.cpu.get_cpu_capability()})")
    path = library_path(variant)
    if not os.path.exists(path):
        return Unavailable(f"not built for this torch: run `llmserve build-kernels` (looked for {path})")
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        return Unavailable(f"{path} does not load: {exc}")
    return Kernels(variant, path)


def build(variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, str]:
    """Compile each variant not built yet, side by side, with the C++ compiler torch was built for (never
    loading one: an AVX-512 library's initialisers may not run on this CPU); variant -> what happened."""
    from torch.utils.cpp_extension import include_paths, library_paths

    results, running = {}, {}
    for variant in variants:
        target = library_path(variant)
        if os.path.exists(target):
            results[variant] = f"already built: {target}"
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        command = [
            os.environ.get("CXX", "c++"), *(os.path.join(HERE, name) for name in SOURCES), "-shared", "-fPIC",
            "-std=c++17", *COMMON_FLAGS, *VARIANTS[variant], f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{path}" for path in include_paths()), *(f"-L{path}" for path in library_paths()),
            "-lc10", "-ltorch_cpu", "-ltorch", "-o", target + ".tmp",
        ]
        try:
            running[variant] = (target, subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
        except OSError as exc:  # no compiler
            results[variant] = f"failed: {command[0]}: {exc.strerror}"
    for variant, (target, process) in running.items():
        _, stderr = process.communicate()
        if process.returncode == 0:
            os.replace(target + ".tmp", target)  # whole or not at all: a half-written library never loads
            results[variant] = f"built {target}"
        else:
            errors = [line for line in stderr.splitlines() if "error" in line.lower()]
            results[variant] = "failed: " + "\n".join(errors[-5:] or stderr.splitlines()[-5:])
    return {variant: results[variant] for variant in variants}
