"""The one dispatch table: which kernel runs a ScoreProgram attention on given tensors.

Each entry names a kernel module of `fa3_inductor.kernels` exposing `supports(prog, q, k, v, operands)`
(None when it can run, else the reason it cannot), `forward` and `backward`. A new kernel variant is one
new entry here. `supports` looks only at shapes, dtypes and devices, so the same call answers at compile
time on fake tensors (for the explain report) and at run time.

FP8 entries (`fp8=True`) are considered only when the op received an FP8 recipe (kernels/fp8_recipe.py),
and before every 16-bit entry; their `supports` and `forward` take the recipe as one more argument. A site
they cannot serve falls back to the 16-bit entries, and the reasons are reported (explain, log). The
backward of an FP8 forward is the 16-bit backward: the op's backward dispatches without the recipe, so it
runs the entry that would serve the site without FP8, on the original q, k, v and the FP8 forward's out
and lse (the fp8 entry's `backward` names that same 16-bit kernel).

Every run-time choice is counted in `STATS` ((pass, entry name) -> calls) and logged once per pair at INFO on
the `fa3_inductor` logger, so a benchmark can say which kernel ran the forward and the backward.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .kernels import fp8_portable, hopper, hopper_bwd, launcher, reference, triton_decode, triton_portable
from .kernels.fp8_recipe import Fp8Recipe
from .kernels.program import ScoreProgram


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    name: str
    devices: tuple          # device types it runs on natively
    interpretable: bool     # also runs on CPU under TRITON_INTERPRET=1
    supports: Callable      # (prog, q, k, v, operands) -> str | None
    forward: Callable       # (q, k, v, operands, prog) -> (out, lse)
    backward: Callable      # (dout, q, k, v, operands, out, lse, prog) -> (dq, dk, dv, [d operands])
    fp8: bool = False       # an FP8 forward: supports / forward take the recipe as a last argument
    family: str | None = None   # the `kernel` preference that selects it (default: its name)
    # the backward may serve fewer sites than the forward: (prog, q, k, v, operands) -> reason | None; where it
    # declines, the next entry of the table that supports the site runs the backward (select_backward)
    backward_supports: Callable | None = None

    def run_forward(self, q, k, v, operands, prog, recipe: Fp8Recipe | None):
        if self.fp8:
            return self.forward(q, k, v, operands, prog, recipe)
        return self.forward(q, k, v, operands, prog)


def _reference_backward(dout, q, k, v, operands, out, lse, prog):
    return reference.backward(dout, q, k, v, operands, prog)


REFERENCE = KernelEntry("reference", ("cpu", "cuda"), False, lambda *a: None, reference.forward,
                        _reference_backward)

# Fastest first; "auto" takes the first entry that runs on the device and supports the site.
TRITON = KernelEntry("triton", ("cuda",), True, triton_portable.supports, triton_portable.forward,
                     triton_portable.backward)

# sm_90: the warp-specialized Gluon forward and backward (FlashAttention-3 schedules); the forward writes the
# same (out, lse) as the portable one, so where the warp-specialized backward declines (operand gradients,
# NaN rows, head dims, deterministic mode) the portable backward runs on them.
HOPPER = KernelEntry("hopper", ("cuda",), False, hopper.supports, hopper.forward, hopper.backward,
                     backward_supports=hopper_bwd.supports)

TRITON_FP8 = KernelEntry("triton_fp8", ("cuda",), True, fp8_portable.supports, fp8_portable.forward,
                         triton_portable.backward, fp8=True, family="triton")

# sm_90 FP8: the same warp-specialized schedule on e4m3 wgmma after the fused quantize pass.
HOPPER_FP8 = KernelEntry("hopper_fp8", ("cuda",), False, hopper.supports_fp8, hopper.forward_fp8,
                         triton_portable.backward, fp8=True, family="hopper")

# A few queries against a long KV cache (generation): split-KV, GQA-packed; its supports() takes only those.
DECODE = KernelEntry("triton-decode", ("cuda",), True, triton_decode.supports, triton_decode.forward,
                     triton_decode.backward, family="triton")

TABLE: list[KernelEntry] = [HOPPER_FP8, TRITON_FP8, DECODE, HOPPER, TRITON, REFERENCE]

STATS: collections.Counter = collections.Counter()
_log = logging.getLogger("fa3_inductor")


def _runs_on(entry: KernelEntry, device: str) -> bool:
    if device in entry.devices:
        return True
    return device == "cpu" and entry.interpretable and os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp8_fallback_reason(passed_over: list[str]) -> str:
    """Why no FP8 entry served a site that asked for FP8, from select's passed-over list."""
    fp8_names = {e.name for e in TABLE if e.fp8}
    return "; ".join(r for r in passed_over if r.split(":")[0] in fp8_names) or "no FP8 kernel"


CLASSED_QUERIES = 16    # queries per head of the calls whose K / V key by class: decode steps
_BOUND = 2 ** 31 - 1    # tp.supports: spans and the operand-gradient buffer must stay below this


def _kv_key(t, axis: int):
    """What `supports` sees of k, v (axis 2) or an operand (axis 3: its key axis). A contiguous tensor by its other
    sizes, its key length by class — values up to 16 exact, larger ones by bit length and low four bits (TMA's
    16-byte stride rule at any element size, Triton's divisibility by 16) — its dtype and 16-byte alignment: its
    strides follow from the shape wherever a size exceeds 1 (the last one too: it is checked), and `supports`
    looks at no other stride. None where a tensor of that class might reach _BOUND. Anything else exactly."""
    shape = t.shape
    if not t.is_contiguous() or len(shape) != 4 or shape[3] <= 1:     # (a size-1 last dim: its stride is free)
        return shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0
    n = shape[axis]
    if n <= 16:
        return shape, t.dtype, t.data_ptr() % 16 == 0
    bits = n.bit_length()
    a, b, c = (shape[0], shape[1], shape[3]) if axis == 2 else (shape[0], shape[1], shape[2])
    if a * b * c << bits >= _BOUND:
        return None
    return a, b, c, bits, n & 15, t.dtype, t.data_ptr() % 16 == 0


def _select_key(prog, q, k, v, operands, preference, fp8):
    """What every entry's `supports` looks at, or None for fake tensors and the meta device (compile time:
    symbolic sizes, no storage; not memoised): q exactly (shape, strides, dtype, 16-byte alignment); for up to
    CLASSED_QUERIES queries per head, k, v and the operands by _kv_key, so that a contiguous cache growing by a
    key per call (DynamicCache) keeps hitting one key per class, every `supports` answering alike across a class
    (tests/test_select_class.py). Where a tensor of the class could reach the 2^31 bounds of the portable
    kernels, and for longer queries (a prefill: one call per length), every tensor is exact (key[6]).
    On CPU also TRITON_INTERPRET."""
    base = _key_base(prog, q, operands, preference, fp8)
    if base is None:
        return None
    qs = q.shape
    if len(qs) != 4 or qs[2] > CLASSED_QUERIES:
        exact = launcher.call_key((q, k, v, *operands))
        return base + (exact[0], True, exact[1:])
    head = base + ((qs, q.stride(), q.dtype, q.data_ptr() % 16 == 0),)
    rest = [_kv_key(t, 3) for t in operands]
    kk, vk = _kv_key(k, 2), _kv_key(v, 2)
    if kk is None or vk is None or None in rest or qs[0] * qs[1] * qs[2] << k.shape[2].bit_length() >= _BOUND:
        return head + (True, launcher.call_key((k, v, *operands)))
    return head + (False, kk, vk, *rest)


def _key_base(prog, q, operands, preference, fp8):
    """(program, preference, recipe, device, TRITON_INTERPRET on CPU): the part of every select key that is not
    a tensor's layout; None for fake tensors and the meta device (compile time: not memoised)."""
    if isinstance(q, FakeTensor) or (operands and any([isinstance(t, FakeTensor) for t in operands])):
        return None
    device = q.device
    if device.type == "meta":
        return None
    return (prog, preference, fp8, device, os.environ.get("TRITON_INTERPRET", "0") if device.type == "cpu" else None)


def _exact_key(prog, q, k, v, operands, preference, fp8):
    """A key with every tensor exact (shapes, strides, dtypes, 16-byte alignment), or None as _select_key."""
    base = _key_base(prog, q, operands, preference, fp8)
    return None if base is None else base + (launcher.call_key((q, k, v, *operands)),)


_SELECTED: dict = {}    # exact keys (key[6]): per (program, preference, recipe, device, q's layout), the latest few
_RECENT = 8     # exact keys remembered per query layout (self- and cross-attention, local and global layers)
_SELECTED_CLASS: dict = {}  # class keys: one per class, never one per length


def select(prog: ScoreProgram, q, k, v, operands, preference: str = "auto",
           fp8: Fp8Recipe | None = None) -> tuple[KernelEntry, list[str]]:
    """Memoised _select: a launch must not pay Python support checks on every call (S=512 prefill was
    CPU-bound on them). Keys by class (_select_key) go in one dict: a cache that grows by a key per generated
    token (DynamicCache) meets a new class only every few tokens (16 per bit length at most). Exact keys are
    held per (program, preference, recipe, device, q's layout), the last few, most recent first: a cache too
    large to class replaces its own older entries and leaves the others' (a cross-attention's fixed keys) in
    place, so nothing grows per token."""
    key = _select_key(prog, q, k, v, operands, preference, fp8)
    if key is None:
        return _select(prog, q, k, v, operands, preference, fp8)
    if not key[6]:
        hit = _SELECTED_CLASS.get(key)
        if hit is None:
            if len(_SELECTED_CLASS) > 4096:
                _SELECTED_CLASS.clear()
            hit = _SELECTED_CLASS[key] = _select(prog, q, k, v, operands, preference, fp8)
        return hit
    shape_class = key[:6]
    recent = _SELECTED.get(shape_class)
    if recent is not None:
        for i, (seen, hit) in enumerate(recent):
            if seen == key:
                if i:
                    recent.insert(0, recent.pop(i))
                return hit
    else:
        if len(_SELECTED) > 4096:
            _SELECTED.clear()
        recent = _SELECTED[shape_class] = []
    hit = _select(prog, q, k, v, operands, preference, fp8)
    recent.insert(0, (key, hit))
    del recent[_RECENT:]
    return hit


def _select(prog: ScoreProgram, q, k, v, operands, preference: str = "auto",
            fp8: Fp8Recipe | None = None) -> tuple[KernelEntry, list[str]]:
    """Pick the kernel; also say why faster entries were passed over. The reference always serves.
    fp8: the recipe when FP8 was asked for (FP8 entries are skipped silently when it is None)."""
    device = q.device.type
    passed_over = []
    for entry in TABLE:
        if entry.fp8 and fp8 is None:
            continue
        if preference != "auto" and (entry.family or entry.name) != preference:
            if entry.fp8:
                passed_over.append(f"{entry.name}: kernel={preference} asked for")
            continue
        if not _runs_on(entry, device):
            passed_over.append(f"{entry.name}: does not run on {device}"
                               + (" (set TRITON_INTERPRET=1)" if entry.interpretable else ""))
            continue
        reason = entry.supports(prog, q, k, v, operands, *((fp8,) if entry.fp8 else ()))
        if reason is None:
            return entry, passed_over
        passed_over.append(f"{entry.name}: {reason}")
    return REFERENCE, passed_over


_SELECTED_BWD: dict = {}


def select_backward(prog: ScoreProgram, q, k, v, operands, preference: str = "auto") -> tuple[KernelEntry, list[str]]:
    """The entry that runs the backward: the forward's (without FP8), unless its backward_supports declines the
    site; then the next entry down the table that runs on the device and supports it (whatever the preference:
    the forward already honoured it, and its (out, lse) are every entry's)."""
    # one key and one lookup per call once memoised (the forward's select is not asked again)
    key = _exact_key(prog, q, k, v, operands, preference, None)   # backward_supports: not class-proven
    if key is not None:
        key = key + (torch.are_deterministic_algorithms_enabled(),)
        hit = _SELECTED_BWD.get(key)
        if hit is not None:
            return hit
    entry, passed_over = _select(prog, q, k, v, operands, preference)
    reason = entry.backward_supports(prog, q, k, v, operands) if entry.backward_supports else None
    hit = entry, passed_over
    if reason is not None:
        passed_over = passed_over + [f"{entry.name} backward: {reason}"]
        hit = REFERENCE, passed_over
        for later in TABLE[TABLE.index(entry) + 1:]:
            if later.fp8 or not _runs_on(later, q.device.type):
                continue
            why = later.supports(prog, q, k, v, operands)
            if why is None:
                hit = later, passed_over
                break
            passed_over.append(f"{later.name}: {why}")
    if key is not None:
        if len(_SELECTED_BWD) > 4096:
            _SELECTED_BWD.clear()
        _SELECTED_BWD[key] = hit
    return hit


def record(which: str, entry: KernelEntry, passed_over: list[str]) -> None:
    """Count a run-time choice ("forward" / "backward"); log the first of each (pass, kernel) pair."""
    key = (which, entry.name)
    if key not in STATS:
        _log.info("fa3 dispatch: %s runs %s%s", which, entry.name,
                  f" (passed over: {'; '.join(passed_over)})" if passed_over else "")
    STATS[key] += 1
