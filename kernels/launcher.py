"""Cached launches: the host cost of a model's attention call.

`kernel[grid](*args, **kwargs)` re-derives on every call what the compiled kernel is specialised on (each
argument's type, 16-byte alignment, divisibility by 16, value 1, the constexprs) and looks the compiled kernel
up by it; at the S=512 prefill of the ANCHORS Llama that was ~37 µs of a ~240 µs call (bench/launch_overhead.py).
A caller of `launch` passes a key that already pins all of that — the shapes, strides, dtypes and alignments of
the tensors every argument is derived from, and the constexprs — so after the first launch under a key the
compiled kernel is started directly (CompiledKernel's own launch path, which JITFunction.run ends in).

Only for kernels whose call passes every parameter positionally or by keyword, except trailing parameters
with defaults (their defaults are what the compiled kernel was specialised on, so they are passed as such);
anything else, the interpreter, and the first call per key take the ordinary launch.
"""

from __future__ import annotations

from triton import knobs
from triton.runtime.driver import driver

_COMPILED: dict = {}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "warp_size")


def _direct(ck, tail: tuple) -> tuple | None:
    try:
        ck.run                  # loads the module (raises if it cannot run here)
        ck.function, ck.packed_metadata
    except Exception:
        return None
    return ck, tail


def _run(hit, grid: tuple, args: tuple, kwargs: dict) -> None:
    """Start a cached compiled kernel (what JITFunction.run ends in) on the current stream."""
    ck, tail = hit
    drv = driver.active
    stream = drv.get_current_stream(drv.get_current_device())
    values = args + tuple(kwargs[n] if n in kwargs else d for n, d in tail) if tail else args
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if not getattr(enter, "calls", True) and not getattr(leave, "calls", True):
        # empty hook chains (Triton 3.6 keeps them as objects, never None): calling them does nothing, so the
        # launch metadata they would receive is not built and the C launcher is told there are no hooks
        enter = leave = None
    meta = ck.launch_metadata(grid, stream, *values) if enter is not None or leave is not None else None
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    ck.run(grid[0], g1, g2, stream, ck.function, ck.packed_metadata, meta, enter, leave, *values)


def launch(key, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
    """Launch kernel[grid](*args, **kwargs); `key` must determine everything the kernel is specialised on
    (never the data pointers themselves, which change from call to call)."""
    hit = _COMPILED.get(key)
    if hit is not None:
        _run(hit, grid, args, kwargs)
        return
    ck = kernel[grid](*args, **kwargs)
    names = getattr(kernel, "arg_names", None)
    if key is None or names is None or not hasattr(ck, "packed_metadata"):
        return
    given = set(kwargs) - set(_OPTIONS)
    params = getattr(kernel, "params", None)
    defaults = {p.name: p.default for p in params if p.has_default} if params is not None else {}
    tail = tuple(names[len(args):])
    if not given <= set(tail) or any(n not in given and n not in defaults for n in tail):
        return                  # unknown keywords or an unpassed parameter without a default: ordinary launch
    tail = tuple((n, defaults.get(n)) for n in tail)
    direct = _direct(ck, tail)
    if direct is not None:
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
        _COMPILED[key] = direct


class Site:
    """One launch of a caller's plan, whose key (see `launch`) the plan already pins: after the first launch
    that could be cached, the compiled kernel is kept here, so a call does not even hash the key. Until then
    `kernel` (read by the caller at call time) takes the ordinary path. The key pins the constexprs too, so the
    trailing parameters' values (kwargs or defaults) are resolved once, at the first cached launch. Holds no
    tensors (a plan outlives its calls; CUDA graph pools check for leaked tensors)."""

    __slots__ = ("key", "hit", "tail")

    def __init__(self, key):
        self.key, self.hit, self.tail = key, None, ()

    def __call__(self, kernel, grid: tuple, args: tuple, kwargs: dict) -> None:
        if self.hit is not None:
            _run(self.hit, grid, args + self.tail if self.tail else args, kwargs)
            return
        launch(self.key, kernel, grid, args, kwargs)
        hit = _COMPILED.get(self.key)
        if hit is not None:
            ck, tail = hit
            self.tail = tuple([kwargs[n] if n in kwargs else d for n, d in tail])
            self.hit = (ck, ())


def call_key(tensors) -> tuple:
    """What a launch derived from these (real, concrete) tensors is specialised on: shape, strides, dtype and
    16-byte alignment of each (data pointers excluded)."""
    return tuple([(t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


_I32 = (-2 ** 31, 2 ** 31)


def int_classes(xs: list) -> tuple:
    """How Triton specialises each of these integer arguments: a value of 1 becomes a constant, a multiple of 16
    is marked divisible, and the type is i32, i64 or u64 by range. Two argument lists with the same classes (and
    the same constexprs, pointer dtypes and alignments) run the same compiled kernel, whatever the values."""
    if not xs:
        return ()
    if _I32[0] <= min(xs) and max(xs) < _I32[1]:
        return tuple([2 if x == 1 else x % 16 == 0 for x in xs])
    return tuple([(2 if x == 1 else x % 16 == 0, 32 if _I32[0] <= x < _I32[1] else 64 if x < 2 ** 63 else 65)
                  for x in xs])


def int_types(xs: list):
    """Triton's specialisation of integer arguments it is told not to specialise on (do_not_specialize): only
    their type, i32 / i64 / u64 by range. True when all are i32."""
    if _I32[0] <= min(xs) and max(xs) < _I32[1]:
        return True
    return tuple([32 if _I32[0] <= x < _I32[1] else 64 if x < 2 ** 63 else 65 for x in xs])


def aligned(tensors: list):
    """Triton's pointer specialisation of these tensors: True when all are 16-byte aligned, else which are."""
    ptrs = [t.data_ptr() for t in tensors]
    acc = 0
    for p in ptrs:
        acc |= p
    return True if acc % 16 == 0 else tuple([p % 16 == 0 for p in ptrs])
