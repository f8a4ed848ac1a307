"""`bound(n)`: a run-time loop bound of a hand-written Triton kernel, usable in `range(...)` both compiled and
under TRITON_INTERPRET=1.

The 3.6 interpreter passes scalar arguments as 1-element numpy arrays, which NumPy 2 refuses to turn into the
int `range()` needs; there `bound` unwraps them. Compiled, it is the identity (inlined). Triton reads
TRITON_INTERPRET when a kernel is defined, and so does this module, when it is imported.
"""

from __future__ import annotations

import os

import triton

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    def bound(t):
        return int(t.handle.data.reshape(-1)[0]) if hasattr(t, "handle") else int(t)
else:
    @triton.jit
    def bound(t):
        return t
