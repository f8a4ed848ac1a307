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


def _cuobjdump(compiled, flag: str) -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        return subprocess.run([os.path.join(bindir, "cuobjdump"), flag, path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


def sass_text(compiled) -> str:
    """The SASS listing (cuobjdump --dump-sass)."""
    return _cuobjdump(compiled, "--dump-sass")


def sass_facts(compiled) -> dict:
    """Registers, local-memory traffic and tensor-core instruction counts (HGMMA: 16-bit, QGMMA: fp8)."""
    usage = _cuobjdump(compiled, "--dump-resource-usage")
    sass = sass_text(compiled)
    regs = re.search(r"REG:(\d+)", usage)
    return {"regs": int(regs.group(1)) if regs else None,
            "local_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            "loop_local_ops": _loop_local_ops(sass),
            "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
            "hmma": len(re.findall(r"\bHMMA\b", sass)),
            "qgmma": len(re.findall(r"\bQGMMA\b", sass)),
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


def _sass_instrs(sass: str) -> list[tuple[int, str]]:
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(text: str) -> str:
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main_loop_mix(sass: str) -> dict | None:
    """Instruction mix of one trip through the first key loop of a warp-specialized attention kernel (the first
    innermost backward branch over a body with tensor-core MMAs and a wgmma wait: consumer 0's main loop), on its
    unmasked path: a forward branch over a block that ends in an unconditional branch and selects -INF (the
    masked softmax) is left out. {"total": n, "local": spills in the loop, opcode: count, ...} or None."""
    path = main_loop_path(sass)
    if path is None:
        return None
    path = [t for _, t in path]
    mix: dict = {"total": len(path), "local": sum(_opcode(t) in ("LDL", "STL") for t in path)}
    for t in path:
        mix[_opcode(t)] = mix.get(_opcode(t), 0) + 1
    return mix


def main_loop_path(sass: str) -> list[tuple[int, str]] | None:
    """(address, text) of the instructions of main_loop_mix's trip, in program order, or None."""
    ins = _sass_instrs(sass)
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA 0x([0-9a-f]+)", text)
        if not m or _opcode(text) != "BRA" or int(m.group(1), 16) >= addr:
            continue
        body = [(a, t) for a, t in ins if int(m.group(1), 16) <= a <= addr]
        if sum(_opcode(t) in ("QGMMA", "HGMMA") for _, t in body) >= 2 and any("DEPBAR" in t for _, t in body):
            loops.append(body)
    # innermost: no other such loop inside it; the first of those in code order
    inner = [b for b in loops if not any(o is not b and b[0][0] <= o[0][0] and o[-1][0] <= b[-1][0] for o in loops)]
    if not inner:
        return None
    body = min(inner, key=lambda b: b[0][0])
    skip = set()
    for a, t in body:
        m = re.search(r"BRA 0x([0-9a-f]+)", t)
        if m and t.startswith("@") and _opcode(t) == "BRA" and a < int(m.group(1), 16) <= body[-1][0]:
            blk = [(x, y) for x, y in body if a < x < int(m.group(1), 16)]
            if blk and _opcode(blk[-1][1]) == "BRA" and not blk[-1][1].startswith("@") and \
                    any("-INF" in y for _, y in blk):
                skip = {x for x, _ in blk}
                break
    return [(a, t) for a, t in body if a not in skip]
