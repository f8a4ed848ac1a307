"""The sm_90a cross-compiler of the CPU tests (tests/sm90_cross_compile.py), or None with a skip marker where this
Triton build has no Gluon / NVIDIA backend."""

from __future__ import annotations

import pytest

try:
    import sm90_cross_compile as sm90
    import triton.experimental.gluon  # noqa: F401
    WHY = None
except Exception as exc:   # pragma: no cover - depends on the Triton build
    sm90, WHY = None, repr(exc)

GLUON = pytest.mark.skipif(sm90 is None, reason=f"Triton without Gluon / NVIDIA backend: {WHY}")
