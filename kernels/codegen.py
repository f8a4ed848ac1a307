"""Turns a ScoreProgram into Triton source: one module per specialisation, cached on disk, loaded by importlib.

A specialisation (`KernelSpec`) is everything that changes the generated code: the program, the head dims
(padded to powers of two), the dtype, the grouped-query ratio, per operand its kind, dtype and which of
its four dims broadcast, and the variant (the general kernels, or the split-KV decode kernels). Batch, heads and sequence lengths are runtime values. The kernels' text lives in
`kernels/templates.py`; this file holds the expression emitter, the spec, and the disk cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import threading

import torch

from . import reference
from .program import COMPARE, LEAVES, ScoreProgram, render

CODEGEN_VERSION = "15"
LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class OperandSpec:
    kind: str              # "bool" or "float"
    dtype: str             # torch dtype name, e.g. "float16"
    bcast: tuple           # (b, h, m, n): True where the operand has size 1 and is broadcast


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    program: str           # ScoreProgram.dumps()
    dtype: str             # q/k/v dtype name (float8_e4m3fn: the FP8 forward)
    D: int
    DV: int
    G: int                 # query heads per kv head
    operands: tuple        # OperandSpec per operand
    interpret: bool        # generated for the CPU interpreter (no libdevice there)
    variant: str = "attention"   # "attention": forward + backward kernels; "decode": split-KV decode kernels

    @property
    def fp8(self) -> bool:
        """q/k/v are e4m3 (kernels/fp8_quant.py): the FP8 forward variant of the templates."""
        return self.dtype.startswith("float8")

    @property
    def BD(self) -> int:
        return pad_dim(self.D, 32 if self.fp8 else 16)      # an FP8 tensor-core dot needs K >= 32

    @property
    def BDV(self) -> int:
        return pad_dim(self.DV, 32 if self.fp8 else 16)

    @property
    def prog(self) -> ScoreProgram:
        return ScoreProgram.loads(self.program)

    def key(self) -> str:
        text = repr((CODEGEN_VERSION, dataclasses.astuple(self)))
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def imprecise_possible(spec: KernelSpec) -> bool:
    """Can a row's fp32 lse lose log l (reference.IMPRECISE_LSE): an operand that is not boolean (a dense additive
    mask or bias) or an enormous finite constant in the program. The backward of such a spec finds those rows on
    the device and computes their gradient exactly (attn_bwd_imprecise, templates_uniform.py)."""
    return any(o.kind != "bool" for o in spec.operands) or reference.enormous_constant(spec.prog.expr)


def pad_dim(d: int, least: int = 16) -> int:
    return max(least, 1 << max(0, (d - 1).bit_length()))


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


VARIANTS = ("attention", "decode")


def make_spec(prog: ScoreProgram, q, k, v, operands, interpret: bool, variant: str = "attention") -> KernelSpec:
    b, hq, sq, _ = q.shape
    full = (b, hq, sq, k.shape[2])
    ops = []
    for t in operands:
        bc = tuple(bool(t.shape[i] == 1 and full[i] != 1) or t.shape[i] == 1 for i in range(4))
        ops.append(OperandSpec("bool" if t.dtype == torch.bool else "float", dtype_name(t.dtype), bc))
    return KernelSpec(prog.dumps(), dtype_name(q.dtype), q.shape[-1], v.shape[-1], hq // k.shape[1],
                      tuple(ops), bool(interpret), variant)


# --- expression emitter -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Val:
    text: str
    kind: str        # "float" | "bool"
    scalar: bool     # a Python literal (constant subtree, folded)
    full: bool       # certainly of the tile's full 2-D shape


def _fold(e):
    """Evaluate a constant-only subtree exactly as the reference does (fp32 torch ops); None if impossible."""
    try:
        val = reference.evaluate(e, torch.zeros((), dtype=torch.float32), [], None, None)
    except Exception:
        return None
    if isinstance(val, torch.Tensor):
        if val.numel() != 1:
            return None
        val = val.item()
    return val


def _literal(val) -> Val:
    if isinstance(val, bool):
        return Val("True" if val else "False", "bool", True, False)
    val = float(val)
    if math.isnan(val):
        return Val("float('nan')", "float", True, False)
    if math.isinf(val):
        return Val("float('inf')" if val > 0 else "float('-inf')", "float", True, False)
    return Val(repr(val), "float", True, False)


def _const_only(e) -> bool:
    if e[0] == "const":
        return True
    if e[0] in LEAVES:
        return False
    return all(_const_only(a) for a in e[1:])


class Emitter:
    """Emits SSA lines computing expressions on one tile, with common subexpressions shared.

    score: name of the fp32 raw score tile; qi / kj: int32 row / column index tensors broadcastable to the
    tile; row_mask / col_mask: text of the bounds predicates operand loads need (None when in bounds);
    op_base(n): name of operand n's (b, h)-offset base pointer; op_stride(n, dim): its stride name.
    """

    def __init__(self, spec: KernelSpec, score: str, qi: str, kj: str, row_mask, col_mask, prefix="e", ns="tl",
                 op_value=None, pred=None):
        self.spec = spec
        # op_value(n): the name of operand n's tile already loaded (raw dtype), used instead of a load;
        # pred: text of a scalar predicate every operand load also takes (loads of a tile that needs none)
        self.op_value, self.pred = op_value, pred
        self.ns = ns            # "tl" (triton.language) or "gl" (Gluon; tensors carry layouts)
        self.score, self.qi, self.kj = score, qi, kj
        self.row_mask, self.col_mask = row_mask, col_mask
        self.prefix = prefix
        self.lines: list[str] = []
        self.memo: dict = {}
        self.count = 0

    def _new(self, code: str) -> str:
        name = f"{self.prefix}{self.count}"
        self.count += 1
        self.lines.append(f"{name} = {code}")
        return name

    def _float(self, v: Val) -> str:
        if v.kind == "bool":
            return f"{v.text}.to({self.ns}.float32)" if not v.scalar else ("1.0" if v.text == "True" else "0.0")
        return v.text

    def _bool(self, v: Val) -> str:
        if v.kind == "bool":
            return v.text
        return f"({v.text} != 0.0)"

    def _tensor(self, text: str, kind: str = "float") -> str:
        if self.ns == "gl":
            return text     # Gluon broadcasts Python scalars into the other operand's layout
        dt = "tl.int1" if kind == "bool" else "tl.float32"
        return f"tl.full([1, 1], {text}, {dt})"

    def emit(self, e) -> Val:
        if e in self.memo:
            return self.memo[e]
        v = self._emit(e)
        self.memo[e] = v
        return v

    def _emit(self, e) -> Val:
        op = e[0]
        if op == "const" or (op not in LEAVES and _const_only(e)):
            val = e[1] if op == "const" else _fold(e)
            if val is not None:
                return _literal(val)
        if op == "score":
            return Val(self.score, "float", False, True)
        if op == "q_idx":
            return Val(self._new(f"{self.qi}.to({self.ns}.float32)"), "float", False, False)
        if op == "k_idx":
            return Val(self._new(f"{self.kj}.to({self.ns}.float32)"), "float", False, False)
        if op == "operand":
            return self._load_operand(e[1])
        args = [self.emit(a) for a in e[1:]]
        full = any(a.full for a in args)
        if op == "identity":
            return args[0]
        if op == "neg":
            return Val(self._new(f"-{self._float(args[0])}"), "float", False, full)
        if op == "not":
            return Val(self._new(f"{self._bool(args[0])} == 0"), "bool", False, full)
        if op in ("tanh", "exp", "abs", "sigmoid"):
            a = self._float(args[0])
            if args[0].scalar:
                a = self._tensor(a)
            fn = {"tanh": "_tanh", "exp": f"{self.ns}.exp", "abs": f"{self.ns}.abs", "sigmoid": "_sigmoid"}[op]
            return Val(self._new(f"{fn}({a})"), "float", False, full)
        if op in ("add", "sub", "mul", "div"):
            sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
            a, b = self._float(args[0]), self._float(args[1])
            return Val(self._new(f"{a} {sym} {b}"), "float", False, full)
        if op in ("maximum", "minimum"):
            a, b = self._float(args[0]), self._float(args[1])
            if args[0].scalar:
                a = self._tensor(a)
            fn = f"{self.ns}.maximum" if op == "maximum" else f"{self.ns}.minimum"
            return Val(self._new(f"{fn}({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"), "float", False, full)
        if op in COMPARE:
            sym = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}[op]
            if args[0].kind == "bool" and args[1].kind == "bool":
                a, b = args[0].text, args[1].text
            else:
                a, b = self._float(args[0]), self._float(args[1])
            if args[0].scalar:
                a = self._tensor(a, "bool" if a in ("True", "False") else "float")
            return Val(self._new(f"{a} {sym} {b}"), "bool", False, full)
        if op in ("and", "or"):
            a, b = self._bool(args[0]), self._bool(args[1])
            if args[0].scalar:
                a = self._tensor(a, "bool")
            sym = "&" if op == "and" else "|"
            return Val(self._new(f"{a} {sym} {b}"), "bool", False, full)
        if op == "where":
            c, a, b = args
            if c.scalar:
                return a if c.text == "True" else b
            return Val(self._new(f"{self.ns}.where({self._bool(c)}, {self._float(a)}, {self._float(b)})"), "float",
                       False, full)
        raise ValueError(f"cannot emit {op!r}")

    def raw_load(self, n: int) -> str:
        """Name of a new value: operand n's tile loaded in its own dtype (bounds predicates as configured)."""
        _, _, bm, bn = self.spec.operands[n].bcast
        ptr = f"OP{n}b"
        if not bm:
            ptr += f" + {self.qi}.to({self.ns}.int64) * st{n}_m"
        if not bn:
            ptr += f" + {self.kj} * st{n}_n"
        masks = [m for m, skip in ((self.row_mask, bm), (self.col_mask, bn)) if m and not skip]
        if self.pred and not any(self.pred in m for m in masks):     # (a row mask may carry it already)
            masks.append(self.pred)
        mask = f", mask={' & '.join(masks)}, other=0" if masks else ""
        return self._new(f"{self.ns}.load({ptr}{mask})")

    def _load_operand(self, n: int) -> Val:
        ospec = self.spec.operands[n]
        _, _, bm, bn = ospec.bcast
        raw = self.op_value(n) if self.op_value is not None else self.raw_load(n)
        if ospec.kind == "bool":
            return Val(raw, "bool", False, not (bm or bn))
        return Val(self._new(f"{raw}.to({self.ns}.float32)"), "float", False, not (bm or bn))

    def full_float(self, v: Val) -> str:
        """Text of v as a full-shaped fp32 tile."""
        text = self._float(v)
        if v.scalar:
            if self.ns == "gl":
                return self._new(f"gl.full({self.score}.shape, {text}, gl.float32, {self.score}.type.layout)")
            return self._new(f"tl.full({self.score}.shape, {text}, tl.float32)")
        if not v.full:
            return self._new(f"{text} + {self.ns}.zeros_like({self.score})")
        return text


# --- loading generated modules ---------------------------------------------------------------------------

_LOCK = threading.Lock()
_MODULES: dict = {}


def cache_dir() -> str:
    base = os.environ.get("FA3_CACHE_DIR")
    if not base:
        home = os.path.expanduser("~")
        base = os.path.join(home, ".cache", "fa3_inductor") if os.access(home, os.W_OK) else \
            os.path.join(tempfile.gettempdir(), "fa3_inductor")
    path = os.path.join(base, "triton_src")
    os.makedirs(path, exist_ok=True)
    return path


def header(spec: KernelSpec) -> str:
    prog = spec.prog
    lines = [
        "# Generated by fa3_inductor.kernels.codegen (version %s). Do not edit." % CODEGEN_VERSION,
        f"# program: {prog.describe()}",
        f"# expr: {render(prog.expr)}",
        f"# serialised: {spec.program}",
        f"# dtype={spec.dtype} D={spec.D} (block {spec.BD}) Dv={spec.DV} (block {spec.BDV}) G={spec.G} "
        f"interpret={spec.interpret} variant={spec.variant}",
    ]
    for n, o in enumerate(spec.operands):
        lines.append(f"# operand t{n}: {o.kind} {o.dtype}, broadcast (b,h,m,n)={o.bcast}")
    lines.append(f"# spec key: {spec.key()}")
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _generator(flavor: str):
    if flavor == "portable":
        from .templates import generate
        return generate, "fa3_attn"
    if flavor == "hopper":
        from .templates_hopper import generate
        return generate, "fa3_hopper"
    if flavor == "hopper_bwd":
        from .templates_hopper_bwd import generate
        return generate, "fa3_hopper_bwd"
    raise ValueError(f"unknown kernel flavor {flavor!r}")


def load(spec: KernelSpec, flavor: str = "portable"):
    """The generated module of one flavor (portable Triton, Hopper Gluon forward or backward) for spec (generated, written and
    imported on first use)."""
    generate, prefix = _generator(flavor)
    key = f"{prefix}_{spec.key()}"
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        source = header(spec) + generate(spec)
        path = os.path.join(cache_dir(), f"{key}.py")
        existing = None
        if os.path.exists(path):
            with open(path) as f:
                existing = f.read()
        if existing != source:
            _write_atomic(path, source)
        debug = os.environ.get("FA3_DEBUG_DIR")
        if debug:
            os.makedirs(debug, exist_ok=True)
            _write_atomic(os.path.join(debug, f"{key}.py"), source)
        name = f"fa3_generated_{key}"
        mspec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[name] = mod
        mspec.loader.exec_module(mod)
        _MODULES[key] = mod
        return mod
