"""Compare two directories of dumped logits (`.npy`) file by file with np.allclose.

    llmserve check-precision --base_path dumps/base --new_path dumps/new [--rtol 1e-5] [--atol 1e-5]
    (or: python tools/acc_allclose.py --base_path ... --new_path ...)

Every `.npy` under the base directory must exist under the new one with the same
relative name and shape, and satisfy |new - base| <= atol + rtol * |base|.
Exits 0 when all do, 1 otherwise (also for files only in the new directory, or an
empty base directory).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

MAX_LISTED = 10


@dataclass
class WorstError:
    """The largest error seen so far and the file it was in."""

    value: float = 0.0
    name: Optional[str] = None

    def offer(self, value: float, name: str) -> None:
        if self.name is None or value > self.value:
            self.value, self.name = value, name


@dataclass
class Comparison:
    """The outcome of comparing a base directory with a new one."""

    rtol: float
    atol: float
    num_passed: int = 0
    num_compared: int = 0
    failed: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    missing_in_new: list[str] = field(default_factory=list)
    missing_in_base: list[str] = field(default_factory=list)
    worst_abs: WorstError = field(default_factory=WorstError)
    worst_rel: WorstError = field(default_factory=WorstError)

    @property
    def is_ok(self) -> bool:
        problems = self.failed or self.shape_mismatches or self.missing_in_new or self.missing_in_base
        return self.num_compared > 0 and not problems


def npy_files(root: str) -> set[str]:
    """Relative paths of the `.npy` files under `root`."""
    names = set()
    for directory, _, files in os.walk(root):
        for file in files:
            if file.endswith(".npy"):
                names.add(os.path.relpath(os.path.join(directory, file), root))
    return names


def errors(base: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """Largest absolute and relative difference of `new` from `base` (NaN counts as infinite)."""
    if base.size == 0:
        return 0.0, 0.0
    base64, new64 = base.astype(np.float64), new.astype(np.float64)
    abs_err = np.nan_to_num(np.abs(new64 - base64), nan=np.inf)
    rel_err = abs_err / np.maximum(np.abs(base64), np.finfo(np.float64).tiny)
    return float(abs_err.max()), float(rel_err.max())


def compare_dirs(base_path: str, new_path: str, rtol: float = 1e-5, atol: float = 1e-5) -> Comparison:
    """Compare every `.npy` in `base_path` with its namesake in `new_path`."""
    base_names, new_names = npy_files(base_path), npy_files(new_path)
    result = Comparison(
        rtol=rtol,
        atol=atol,
        missing_in_new=sorted(base_names - new_names),
        missing_in_base=sorted(new_names - base_names),
    )
    for name in sorted(base_names & new_names):
        _compare_file(result, name, np.load(os.path.join(base_path, name)), np.load(os.path.join(new_path, name)))
    return result


def _compare_file(result: Comparison, name: str, base: np.ndarray, new: np.ndarray) -> None:
    result.num_compared += 1
    if base.shape != new.shape:
        result.shape_mismatches.append(f"{name} {base.shape} vs {new.shape}")
        return
    abs_err, rel_err = errors(base, new)
    result.worst_abs.offer(abs_err, name)
    result.worst_rel.offer(rel_err, name)
    if np.allclose(new, base, rtol=result.rtol, atol=result.atol):
        result.num_passed += 1
    else:
        result.failed.append(name)


def report(result: Comparison) -> str:
    """A human-readable summary ending in PASS or FAIL."""
    lines = [
        f"passed {result.num_passed}/{result.num_compared} files (rtol {result.rtol:g}, atol {result.atol:g})",
        _listing("failed", result.failed),
        _listing("shape mismatch", result.shape_mismatches),
        _listing("missing in new", result.missing_in_new),
        _listing("missing in base", result.missing_in_base),
    ]
    if result.worst_abs.name is not None:
        lines.append(f"worst absolute error: {result.worst_abs.value:.3e} in {result.worst_abs.name}")
        lines.append(f"worst relative error: {result.worst_rel.value:.3e} in {result.worst_rel.name}")
    if result.num_compared == 0 and not result.missing_in_base:
        lines.append("no .npy files in the base directory")
    lines.append("PASS" if result.is_ok else "FAIL")
    return "\n".join(lines)


def _listing(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = f" (and {len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return f"{label}: {len(names)}" + (f": {shown}{more}" if names else "")


def parse_args(argv: Optional[list[str]], prog: Optional[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--base_path", required=True, help="directory of reference .npy files")
    parser.add_argument("--new_path", required=True, help="directory of .npy files to check")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """`llmserve check-precision`: compare the directories, print the report, return the exit status."""
    args = parse_args(argv, prog)
    for path in (args.base_path, args.new_path):
        if not os.path.isdir(path):
            print(f"{path} is not a directory", file=sys.stderr)
            return 1
    result = compare_dirs(args.base_path, args.new_path, args.rtol, args.atol)
    print(report(result))
    return 0 if result.is_ok else 1


if __name__ == "__main__":
    sys.exit(main())
