"""Shared setup of the interpreter kernel suites: their pytest marks, score-program shorthands, a private
generated-source cache and poisoned output buffers (NaN for floats, 0x7F — e4m3's NaN — for fp8, -12345 for
integers), so an element a kernel fails to write shows up."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

F8_NAN = 0x7F

# module marks of a suite that runs Triton kernels under the interpreter (test_interpreter_process.py starts it
# in a process with TRITON_INTERPRET=1 from the start)
INTERPRETER_ONLY = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 from process start; run by test_interpreter_process.py"),
]

S = ("score",)


def C(x):
    return ("const", float(x))


def OP(n):
    return ("operand", n)


def poisoned_empty(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    if dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).fill_(F8_NAN)
    elif t.dtype.is_floating_point:
        t.fill_(math.nan)
    else:
        t.fill_(-12345)
    return t


@contextlib.contextmanager
def interpreter_sandbox(cache_dir, modules):
    """TRITON_INTERPRET=1, FA3_CACHE_DIR=cache_dir, and `_empty` of each module poisoned, for the duration."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    mp.setenv("FA3_CACHE_DIR", str(cache_dir))
    for m in modules:
        mp.setattr(m, "_empty", poisoned_empty)
    try:
        yield
    finally:
        mp.undo()
