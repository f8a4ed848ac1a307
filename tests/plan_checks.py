"""Checks shared by the call-plan tests (test_hopper_plan.py, test_decode_plan.py)."""

from __future__ import annotations

import torch
from triton.runtime.jit import KernelInterface


def tensors_held(roots) -> list:
    """Shapes of the tensors reachable from roots through containers and object attributes. A call plan outlives
    its calls, so it must hold none (memory; CUDA graph pools check for leaked tensors). Generated kernels and
    modules are module-level code and are not walked."""
    stack, found, seen = list(roots), [], set()
    while stack:
        x = stack.pop()
        if id(x) in seen or isinstance(x, KernelInterface) or type(x).__name__ == "module":
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x.shape)
        elif isinstance(x, (tuple, list)):
            stack += list(x)
        elif isinstance(x, dict):
            stack += list(x.values())
        elif hasattr(x, "__dict__") or hasattr(x, "__slots__"):
            stack += [getattr(x, a, None) for a in (*getattr(x, "__dict__", {}), *getattr(x, "__slots__", ()))]
    return found
