"""The model's layers, and the swap that replaces some of them by other kernels' forms after loading."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn


def swap_modules(model: nn.Module, replacement: Callable[[str, nn.Module], Optional[nn.Module]]) -> int:
    """Replace each submodule for which `replacement(its attribute name, it)` gives a module; how many were."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = replacement(name, child)
            if new is not None:
                setattr(module, name, new)
                swapped += 1
    return swapped
