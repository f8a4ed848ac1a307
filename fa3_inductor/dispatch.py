"""The one dispatch table: which kernel runs a ScoreProgram attention on given tensors.

Each entry names a kernel module of `fa3_inductor.kernels` exposing `supports(prog, q, k, v, operands)`
(None when it can run, else the reason it cannot), `forward` and `backward`. A new kernel variant is one
new entry here. `supports` looks only at shapes, dtypes and devices, so the same call answers at compile
time on fake tensors (for the explain report) and at run time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from .kernels import hopper, reference, triton_portable
from .kernels.program import ScoreProgram


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    name: str
    devices: tuple          # device types it runs on natively
    interpretable: bool     # also runs on CPU under TRITON_INTERPRET=1
    supports: Callable      # (prog, q, k, v, operands) -> str | None
    forward: Callable       # (q, k, v, operands, prog) -> (out, lse)
    backward: Callable      # (dout, q, k, v, operands, out, lse, prog) -> (dq, dk, dv, [d operands])


def _reference_backward(dout, q, k, v, operands, out, lse, prog):
    return reference.backward(dout, q, k, v, operands, prog)


REFERENCE = KernelEntry("reference", ("cpu", "cuda"), False, lambda *a: None, reference.forward,
                        _reference_backward)

# Fastest first; "auto" takes the first entry that runs on the device and supports the site.
TRITON = KernelEntry("triton", ("cuda",), True, triton_portable.supports, triton_portable.forward,
                     triton_portable.backward)

# sm_90: the warp-specialized Gluon forward (FlashAttention-3 schedule); its backward is the portable one,
# which reads the same (out, lse).
HOPPER = KernelEntry("hopper", ("cuda",), False, hopper.supports, hopper.forward, triton_portable.backward)

TABLE: list[KernelEntry] = [HOPPER, TRITON, REFERENCE]


def _runs_on(entry: KernelEntry, device: str) -> bool:
    if device in entry.devices:
        return True
    return device == "cpu" and entry.interpretable and os.environ.get("TRITON_INTERPRET", "0") == "1"


def select(prog: ScoreProgram, q, k, v, operands, preference: str = "auto") -> tuple[KernelEntry, list[str]]:
    """Pick the kernel; also say why faster entries were passed over. The reference always serves."""
    device = q.device.type
    passed_over = []
    for entry in TABLE:
        if preference != "auto" and entry.name != preference:
            continue
        if not _runs_on(entry, device):
            passed_over.append(f"{entry.name}: does not run on {device}"
                               + (" (set TRITON_INTERPRET=1)" if entry.interpretable else ""))
            continue
        reason = entry.supports(prog, q, k, v, operands)
        if reason is None:
            return entry, passed_over
        passed_over.append(f"{entry.name}: {reason}")
    return REFERENCE, passed_over
