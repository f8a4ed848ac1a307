"""The one attention op, `torch.ops.fa3.attention`, with its fake implementation and autograd.

Every matched site becomes a call of this op. Its arguments are canonical: q (B, Hq, Sq, D),
k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) with Hq a multiple of Hkv (grouped-query attention without copies),
`operands` the external tensors of the score program (each 4-D, broadcastable to (B, Hq, Sq, Sk)),
`program` a serialised ScoreProgram, `kernel` a dispatch preference and `fp8` a serialised FP8 recipe
("" = FP8 off; kernels/fp8_recipe.py). It returns (out, lse); lse is the fp32 log-sum-exp per row, kept for
the backward. The backward of an FP8 forward is the 16-bit backward (see dispatch.py).
out is laid out (B, Sq, Hq, Dv) in memory (`out_strides`), as SDPA's output is: the models' next step,
out.transpose(1, 2).contiguous().reshape(B, Sq, -1) into the o-projection, is then a view, where after a
contiguous (B, Hq, Sq, Dv) output Inductor has to copy the whole output.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import dispatch
from .config import KERNELS
from .kernels.fp8_recipe import Fp8Recipe
from .kernels.program import ScoreProgram

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
log = logging.getLogger("fa3_inductor")
_FP8_WARNED: set = set()


@functools.lru_cache(maxsize=1024)
def load_program(program: str) -> ScoreProgram:
    return ScoreProgram.loads(program)


@functools.lru_cache(maxsize=64)
def load_recipe(fp8: str) -> Fp8Recipe | None:
    return Fp8Recipe.loads(fp8)


def _warn_fp8_fallback(entry, passed_over) -> None:
    """FP8 was asked for and a 16-bit kernel runs: say so once per distinct reason."""
    why = dispatch.fp8_fallback_reason(passed_over)
    if why not in _FP8_WARNED:
        _FP8_WARNED.add(why)
        log.warning("fa3: FP8 requested, running the 16-bit %s kernel instead: %s", entry.name, why)


def out_strides(b: int, hq: int, sq: int, dv: int) -> tuple:
    """Strides of the op's out (B, Hq, Sq, Dv): (B, Sq, Hq, Dv) in memory."""
    return (sq * hq * dv, dv, hq * dv, 1)


def _in_out_layout(out: torch.Tensor) -> torch.Tensor:
    """out with exactly the strides the fake promises. A kernel that wrote (B, Sq, Hq, Dv) order (or a layout with
    the same memory order, which differs only in strides of size-1 dims: a decode step's contiguous
    (B, Hq, 1, Dv)) costs nothing; any other layout is copied once."""
    want = out_strides(*out.shape)
    if out.stride() == want:
        return out
    if out.transpose(1, 2).is_contiguous():
        return out.as_strided(out.shape, want, out.storage_offset())
    return torch.empty_strided(out.shape, want, dtype=out.dtype, device=out.device).copy_(out)


def check_inputs(q, k, v, operands, prog: ScoreProgram) -> None:
    """Raise ValueError with a clear message for arguments the op cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"fa3 attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"fa3 attention: {name} must be 4-D (batch, heads, seq, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"fa3 attention: {name} dtype {t.dtype} is not one of fp16/bf16/fp32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fa3 attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError("fa3 attention: q, k, v are on different devices")
    b, hq, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"fa3 attention: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"fa3 attention: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    if k.shape[3] != d:
        raise ValueError(f"fa3 attention: q head dim {d} != k head dim {k.shape[3]}")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"fa3 attention: q heads {hq} are not a multiple of k/v heads {k.shape[1]}")
    if len(operands) != prog.n_operands:
        raise ValueError(f"fa3 attention: program uses {prog.n_operands} operands, {len(operands)} given")
    full = (b, hq, sq, k.shape[2])
    for n, t in enumerate(operands):
        if t.dim() != 4 or any(s not in (1, f) for s, f in zip(t.shape, full)):
            raise ValueError(f"fa3 attention: operand {n} of shape {tuple(t.shape)} does not broadcast to {full}")
        if t.device != q.device:
            raise ValueError(f"fa3 attention: operand {n} is on {t.device}, q on {q.device}")
        if prog.operand_grad and prog.operand_grad[n] and t.dtype == torch.bool:
            raise ValueError(f"fa3 attention: operand {n} is boolean and cannot take a gradient")


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, operands: list[torch.Tensor],
             program: str, kernel: str, fp8: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    prog = load_program(program)
    recipe = load_recipe(fp8)
    entry, passed_over = dispatch.select(prog, q, k, v, operands, kernel, recipe)
    dispatch.record("forward", entry, passed_over)
    if recipe is not None and not entry.fp8:
        _warn_fp8_fallback(entry, passed_over)
    out, lse = entry.run_forward(q, k, v, operands, prog, recipe)
    return _in_out_layout(out), lse.contiguous()     # the layouts the fake promises


attention_op = torch.library.custom_op("fa3::attention", mutates_args=())(_forward)


@attention_op.register_fake
def _attention_fake(q, k, v, operands, program, kernel, fp8=""):
    b, hq, sq, _ = q.shape
    out = q.new_empty_strided((b, hq, sq, v.shape[-1]), out_strides(b, hq, sq, v.shape[-1]), dtype=v.dtype)
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    return out, lse


def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 operands: list[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                 program: str, kernel: str) -> list[torch.Tensor]:
    """Returns [dq, dk, dv, d operand for each operand whose program.operand_grad flag is set]."""
    prog = load_program(program)
    entry, passed = dispatch.select_backward(prog, q, k, v, operands, kernel)
    dispatch.record("backward", entry, passed)
    # dout as it comes (under torch.compile often a transposed view of the next op's gradient): every
    # backward reads it through its strides, so no copy
    dq, dk, dv, dops = entry.backward(dout, q, k, v, operands, out, lse, prog)
    return [g.contiguous() for g in (dq, dk, dv, *dops)]   # the fake promises contiguous gradients


attention_backward_op = torch.library.custom_op("fa3::attention_backward", mutates_args=())(_backward_op)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, operands, out, lse, program, kernel):
    prog = load_program(program)
    grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    for t, want in zip(operands, prog.operand_grad or ()):
        if want:
            grads.append(t.new_empty(t.shape))
    return grads


def _setup_context(ctx, inputs, output):
    q, k, v, operands, program, kernel, _fp8 = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *operands)
    ctx.program = program
    ctx.kernel = kernel
    ctx.n_operands = len(operands)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *operands = ctx.saved_tensors
    prog = load_program(ctx.program)
    grads = attention_backward_op(dout, q, k, v, operands, out, lse, ctx.program, ctx.kernel)
    dq, dk, dv, *dops = grads
    it = iter(dops)
    d_operands = [next(it) if (prog.operand_grad and prog.operand_grad[n]) else None
                  for n in range(ctx.n_operands)]
    # one entry per input as the dispatcher passed them: it drops a trailing argument equal to its default
    # (fp8=""), and ctx.needs_input_grad has exactly that structure
    return (dq, dk, dv, d_operands) + (None,) * (len(ctx.needs_input_grad) - 4)


attention_op.register_autograd(_backward, setup_context=_setup_context)

_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_VIEW_TRACKING = torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)   # a fallthrough for this op
_BACKENDS = (torch._C.DispatchKey.CUDA, torch._C.DispatchKey.CPU)


def _direct_autograd_kernel(name: str, opdef, body: str):
    """The autograd kernel of op fa3::`name` for CUDA and CPU tensors (registered on AutogradCUDA / AutogradCPU,
    which take precedence over the custom op's own kernel on the Autograd alias). A call that needs no gradient,
    and for which nothing but the backend lies below autograd (no fake, functional or subclass tensors, no
    dispatch mode: the call's dispatch key set says so), runs this module's function `body` at once — what the
    dispatcher would reach after two more crossings between C++ and Python (the custom op's redispatch, then its
    backend wrapper); every other call goes to the custom op's autograd kernel unchanged. A generated token's
    attention calls, and the backward op called by autograd's backward pass, are of the first kind. None (and no
    registration) where this torch lacks the pieces."""
    try:
        from torch._library.autograd import make_autograd_impl
        general = make_autograd_impl(getattr(torch.ops.fa3, name).default, opdef)
        lib = torch.library.Library("fa3", "IMPL")
    except Exception:   # pragma: no cover - depends on torch internals
        return None
    requires_grad, grad_enabled, module = torch._C._any_requires_grad, torch.is_grad_enabled, globals()

    def kernel(keyset, *args, **kwargs):
        if (not (grad_enabled() and requires_grad(*args))
                and ((keyset & _AFTER_AUTOGRAD) - _VIEW_TRACKING).highestPriorityTypeId() in _BACKENDS):
            return module[body](*args, **kwargs)
        return general(keyset, *args, **kwargs)

    for key in ("AutogradCUDA", "AutogradCPU"):
        lib.impl(name, kernel, key, with_keyset=True)
    return lib


_DIRECT = _direct_autograd_kernel("attention", attention_op, "_forward")
_DIRECT_BACKWARD = _direct_autograd_kernel("attention_backward", attention_backward_op, "_backward_op")


def _inference_op():
    """`fa3::attention_infer`: the same op without autograd, for graphs that run with grad mode off (the rewrite
    picks it where the whole graph is inference: rewrite.inference_only). Its CPU / CUDA kernel is this module's
    `_forward`, reached through the dispatcher's C++ autograd fallback and one crossing into Python, where
    fa3::attention's calls pass a Python autograd kernel first (~4 µs per call on CPU; bench/host_counts.py).
    Same schema, fake and semantics as fa3::attention; no backward (a call that needs a gradient gets none:
    the fallback warns when one is asked for)."""
    lib = torch.library.Library("fa3", "FRAGMENT")
    lib.define("attention_infer(Tensor q, Tensor k, Tensor v, Tensor[] operands, str program, str kernel, "
               "str fp8=\"\") -> (Tensor, Tensor)")
    for key in ("CPU", "CUDA"):
        lib.impl("attention_infer", _forward, key)
    torch.library.register_fake("fa3::attention_infer", _attention_fake, lib=lib)
    return lib


_INFER = _inference_op()


def _fp8_arg(fp8) -> str:
    if fp8 is None or fp8 is False:
        return ""
    if fp8 is True:
        return Fp8Recipe().dumps()
    if isinstance(fp8, Fp8Recipe):
        return fp8.dumps()
    if isinstance(fp8, str):
        Fp8Recipe.loads(fp8)
        return fp8
    raise ValueError(f"fa3 attention: fp8 must be a bool, an Fp8Recipe or its serialised form, got {fp8!r}")


def attention(q, k, v, operands=(), program: ScoreProgram | None = None, kernel: str = "auto", fp8=None):
    """Public entry: validated call of the op; returns the attention output (B, Hq, Sq, Dv).
    fp8: True (default recipe: block scales + Hadamard), an Fp8Recipe, or None/False for 16-bit."""
    prog = program if program is not None else ScoreProgram(("mul", ("score",), ("const", q.shape[-1] ** -0.5)))
    if not isinstance(prog, ScoreProgram):
        raise ValueError(f"fa3 attention: program must be a ScoreProgram, got {type(prog).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"fa3 attention: kernel={kernel!r} is not one of {KERNELS}")
    operands = list(operands)
    check_inputs(q, k, v, operands, prog)
    return attention_op(q, k, v, operands, prog.dumps(), kernel, _fp8_arg(fp8))[0]
