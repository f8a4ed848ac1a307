"""Compile a Gluon kernel (or a plain Triton one) for sm_90a on a machine without a GPU (Triton's bundled
ptxas), to read its PTX/SASS.

Mirrors what `kernel[grid](...)` does up to the launch: bind the arguments, specialise, build the
GluonASTSource (ASTSource) and compile it for GPUTarget("cuda", 90, 32).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as triton_compile
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import create_function_from_signature

H100 = GPUTarget("cuda", 90, 32)


def _compile(source, kernel, *args, **kwargs):
    backend = make_backend(H100)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = source(kernel, signature, constexprs, attrs)
    return triton_compile(src, target=H100, options=options.__dict__)


def compile_sm90(kernel, *args, **kwargs):
    """A Gluon kernel."""
    return _compile(GluonASTSource, kernel, *args, **kwargs)


def compile_triton_sm90(kernel, *args, **kwargs):
    """A plain @triton.jit kernel."""
    return _compile(ASTSource, kernel, *args, **kwargs)


def sass_facts(compiled) -> dict:
    """Registers, local-memory traffic and tensor-core instruction counts from the cubin."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    regs = re.search(r"REG:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else None,
            "local_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            "loop_local_ops": _loop_local_ops(sass),
            "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
            "hmma": len(re.findall(r"\bHMMA\b", sass)),
            "shared": compiled.metadata.shared}


def _loop_local_ops(sass: str) -> int:
    """Local-memory instructions inside innermost loop bodies (between a backward branch and its target, holding
    no other loop): spills paid per tile rather than once per program or per outer iteration."""
    instrs = [(int(m.group(1), 16), m.group(2))
              for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in instrs:
        br = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if br and int(br.group(1), 16) < addr:
            loops.append((int(br.group(1), 16), addr))
    inner = [(lo, hi) for lo, hi in loops if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in loops)]
    return sum(1 for addr, text in instrs if re.search(r"\b(?:LDL|STL)\b", text)
               and any(lo <= addr <= hi for lo, hi in inner))
