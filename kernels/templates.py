"""Text of the generated Triton kernels for one KernelSpec (see codegen.py).

Kernels in every generated module:
    attn_fwd        one program per (query block, head, batch): online softmax over key blocks, out + lse
    attn_bwd_pre    delta = rowsum(dO * O); in "nan" and "uniform" modes also flags (batch, kv head) groups with
                    an empty row; where imprecise rows are possible, the lse the gradient kernels read and the
                    list of those rows
    attn_bwd_dkdv   one program per (key block, kv head, batch): loops over the G query heads of the group and
                    the visible query blocks; deterministic (no atomics)
    attn_bwd_dq     one program per (query block, head, batch): dQ, and d(operand) tiles for grad operands
    attn_bwd_uniform  (empty_row="uniform" only) adds the gradient of the rows with no visible key, which the
                    kernels above leave without one (templates_uniform.py)
    attn_bwd_imprecise  (programs with a float operand or an enormous constant) adds the gradient of the rows
                    whose fp32 lse lost log l, which the kernels above skip (templates_uniform.py)
Key (or query) blocks are visited in three runs: [lo, a) masked, [a, b) needing no mask, [b, hi) masked,
so the structural mask and bounds checks cost nothing in the bulk of the loop and hidden tiles are skipped.
Modules of the "decode" variant hold instead the split-KV decode kernels of templates_decode.py (they reuse
the forward's tile functions).

FP8 variant (spec.dtype float8_e4m3fn; only attn_fwd): Q, K, V arrive as e4m3 with fp32 scales, one per
QBM query rows and per QBN key rows (kernels/fp8_quant.py; BLOCK_M divides QBM and BLOCK_N divides QBN, so
each tile has one scale of each). The tile's q·k descale multiplies the product together with the softmax
scale (one multiply per score, as without FP8); P is converted to e4m3 as P·P_SCALE (P <= 1, a power of two:
exact scaling); the per-tile V scale is folded into the running rescale of the accumulator (acc is kept
in units of the current tile's V scale, so `acc = dot(p, v, acc)` stays a plain accumulating dot), and the
last V scale and 1/P_SCALE are applied in the epilogue. Output in O's dtype (the input's), lse in fp32.
"""

from __future__ import annotations

from .codegen import LOG2E, VARIANTS, Emitter, KernelSpec, imprecise_possible
from .program import derivative
from .templates_bwd import BackwardKernels, _and, _ind, _mask_kw
from .templates_decode import DecodeKernels
from .templates_uniform import UniformRowKernels

P_SCALE = 256.0     # softmax probabilities (<= 1) are stored in e4m3 as p * P_SCALE


class _Gen(BackwardKernels, DecodeKernels, UniformRowKernels):
    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self.prog = spec.prog
        self.scale = self.prog.scale_only()
        self.fp8 = spec.fp8
        self.elt = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32",
                    "float8_e4m3fn": "tl.float8e4nv"}[spec.dtype]
        self.prec = ', input_precision="ieee"' if spec.dtype == "float32" else ""
        self.nops = len(spec.operands)
        self.grad_ops = [n for n, w in enumerate(self.prog.operand_grad or ()) if w]
        self.causal = self.prog.causal != "none"
        self.window = self.prog.window
        self.nan_mode = self.prog.empty_row == "nan"
        self.uniform_mode = self.prog.empty_row == "uniform"
        self.imprecise_mode = imprecise_possible(spec)
        self.head_fastest = any(o.bcast[1] and not (o.bcast[2] and o.bcast[3]) for o in spec.operands)
        self.dmask = None if spec.BD == spec.D else f"(offs_d < {spec.D})"
        self.dvmask = None if spec.BDV == spec.DV else f"(offs_dv < {spec.DV})"

    # --- parameter lists -------------------------------------------------------------------------------
    def op_kernel_params(self):
        ps = [f"OP{n}, st{n}_b, st{n}_h, st{n}_m, st{n}_n" for n in range(self.nops)]
        return "".join(p + ", " for p in ps)

    def op_tile_params(self):
        return "".join(f"OP{n}b, st{n}_m, st{n}_n, " for n in range(self.nops))

    def dop_kernel_params(self):
        return "".join(f"DOP{n}, dst{n}_b, dst{n}_h, dst{n}_m, dst{n}_n, " for n in self.grad_ops)

    def dop_tile_params(self):
        return "".join(f"DOP{n}b, dst{n}_m, dst{n}_n, " for n in self.grad_ops)

    def op_bases(self, b="b64", h="h64", grads=False):
        lines = []
        for n, o in enumerate(self.spec.operands):
            ptr = f"OP{n}"
            if not o.bcast[0]:
                ptr += f" + {b} * st{n}_b"
            if not o.bcast[1]:
                ptr += f" + {h} * st{n}_h"
            lines.append(f"OP{n}b = {ptr}")
        for n in (self.grad_ops if grads else ()):
            lines.append(f"DOP{n}b = DOP{n} + {b} * dst{n}_b + {h} * dst{n}_h")
        return lines

    # --- shared pieces -------------------------------------------------------------------------------
    def visible(self):
        parts = []
        if self.causal:
            parts.append("(kj <= qi + coff)")
            if self.window is not None:
                parts.append(f"(kj >= qi + coff - {self.window})")
        return parts

    def score_lines(self, em: Emitter, s: str, want_dscore=False, operand_grads=()):
        """Lines computing x (log2 units when the scale is folded, else natural), the local derivative
        dx/ds (text) and dx/d(operand n) for n in operand_grads (dict of texts)."""
        dops = {}
        if self.scale is not None:
            lines = [f"x = {s} * {self.scale * LOG2E!r}"]
            dloc = repr(float(self.scale)) if want_dscore else None
            for n in operand_grads:
                dops[n] = em._float(em.emit(derivative(self.prog.expr, ("operand", n))))
            return lines + em.lines, dloc, dops
        root = em.emit(self.prog.expr)
        xt = em.full_float(root)
        dloc = None
        if want_dscore:
            dloc = em._float(em.emit(derivative(self.prog.expr, ("score",))))
        for n in operand_grads:
            dops[n] = em._float(em.emit(derivative(self.prog.expr, ("operand", n))))
        return em.lines + [f"x = {xt}"], dloc, dops

    def exp_p(self, x: str, ref: str):
        if self.scale is not None:
            return f"tl.math.exp2({x} - {ref})"
        return f"tl.math.exp2(({x} - {ref}) * {LOG2E!r})"

    def ranges(self):
        W = self.window
        kv = [
            "@triton.jit",
            "def _kv_blocks(m0, Sq, Sk, coff, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
            "    lo = m0 * 0",
            "    hi = lo + Sk",
            "    a = lo",
            "    b = lo + (Sk // BLOCK_N) * BLOCK_N",
        ]
        if self.causal:
            kv += ["    hi = tl.minimum(hi, tl.maximum(m0 + BLOCK_M + coff, 0))",
                   "    b = tl.minimum(b, (tl.maximum(m0 + coff + 1, 0) // BLOCK_N) * BLOCK_N)"]
            if W is not None:
                kv += [f"    lo = (tl.maximum(m0 + coff - {W}, 0) // BLOCK_N) * BLOCK_N",
                       f"    a = ((tl.maximum(m0 + BLOCK_M - 1 + coff - {W}, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N"]
        kv += ["    hi = tl.maximum(hi, lo)",
               "    a = tl.minimum(tl.maximum(a, lo), hi)",
               "    b = tl.minimum(tl.maximum(b, a), hi)",
               "    return lo, a, b, hi", ""]
        qb = [
            "@triton.jit",
            "def _q_blocks(n0, Sq, Sk, coff, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
            "    lo = n0 * 0",
            "    hi = lo + Sq",
            "    a = lo",
            "    b = lo + (Sq // BLOCK_M) * BLOCK_M",
        ]
        if self.causal:
            qb += ["    lo = (tl.maximum(n0 - coff, 0) // BLOCK_M) * BLOCK_M",
                   "    a = ((tl.maximum(n0 + BLOCK_N - 1 - coff, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M"]
            if W is not None:
                qb += [f"    hi = tl.minimum(hi, tl.maximum(n0 + BLOCK_N - coff + {W}, 0))",
                       f"    b = tl.minimum(b, (tl.maximum(n0 - coff + {W} + 1, 0) // BLOCK_M) * BLOCK_M)"]
        qb += ["    hi = tl.maximum(hi, lo)",
               "    a = tl.minimum(tl.maximum(a, lo), hi)",
               "    b = tl.where(n0 + BLOCK_N > Sk, a, b)",
               "    b = tl.minimum(tl.maximum(b, a), hi)",
               "    return lo, a, b, hi", ""]
        return kv + qb

    def pids(self, axis_m="pid_m"):
        """Lines decoding the 3-D grid into pid_m, off_h, off_b (heads fastest when an operand is shared)."""
        if self.head_fastest:
            lines = ["off_h = tl.program_id(0)", f"{axis_m} = tl.program_id(1)", "num_m = tl.num_programs(1)"]
        else:
            lines = [f"{axis_m} = tl.program_id(0)", "off_h = tl.program_id(1)", "num_m = tl.num_programs(0)"]
        lines.append("off_b = tl.program_id(2)")
        if self.causal:
            lines.append(f"{axis_m} = num_m - 1 - {axis_m}")
        lines += [f"off_hk = off_h // {self.spec.G}", "b64 = off_b.to(tl.int64)", "h64 = off_h.to(tl.int64)",
                  "hk64 = off_hk.to(tl.int64)"]
        return lines

    # --- forward -------------------------------------------------------------------------------------
    def fwd_tile(self, masked: bool):
        spec = self.spec
        tag = "masked" if masked else "full"
        colm = "(offs_n[None, :] < Sk)" if masked else None
        em = Emitter(spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)" if masked else None)
        if self.fp8 and self.scale is not None:
            xl = [f"x = s * (qk_ds * {self.scale * LOG2E!r})"]       # descale and softmax scale: one multiply
        else:
            xl, _, _ = self.score_lines(em, "s")
            if self.fp8:
                xl = ["s = s * qk_ds"] + xl
        body = [
            "offs_n = start_n + tl.arange(0, BLOCK_N)",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "qi = offs_m[:, None]",
            "kj = offs_n[None, :]",
            f"kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd"
            f"{_mask_kw(colm, self.dmask and self.dmask + '[:, None]')})",
            f"v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd"
            f"{_mask_kw(masked and '(offs_n[:, None] < Sk)', self.dvmask and self.dvmask + '[None, :]')})",
            f"s = tl.dot(q, kT{self.prec})",
        ] + (["ks = tl.load(KSb + (start_n // QBN) * sksn)", "vs = tl.load(VSb + (start_n // QBN) * svsn)",
              "qk_ds = qs * ks"] if self.fp8 else []) + xl
        if masked:
            body.append(f"x = tl.where({_and('(kj < Sk)', *self.visible())}, x, float('-inf'))")
        body += [
            "m_new = tl.maximum(m_i, tl.max(x, 1))",
            "m_use = tl.where(m_new == float('-inf'), 0.0, m_new)",
            f"p = {self.exp_p('x', 'm_use[:, None]')}",
            f"alpha = {self.exp_p('m_i', 'm_use')}",
            "l_i = l_i * alpha + tl.sum(p, 1)",
        ]
        if self.fp8:
            body += [
                "acc = acc * (alpha * (vs_i / vs))[:, None]",
                f"acc = tl.dot(to_e4m3(p * {P_SCALE!r}, {self.spec.interpret}), v, acc)",
                "return acc, l_i, m_new, vs",
            ]
        else:
            body += [
                "acc = acc * alpha[:, None]",
                f"acc = tl.dot(p.to({self.elt}), v, acc{self.prec})",
                "return acc, l_i, m_new",
            ]
        fp8 = ("vs_i, ", "qs, KSb, VSb, sksn, svsn, ", ", QBN: tl.constexpr") if self.fp8 else ("", "", "")
        head = [
            "@triton.jit",
            f"def _fwd_tile_{tag}(acc, l_i, m_i, {fp8[0]}q, k_base, v_base, skn, skd, svn, svd, start_n, offs_m, "
            f"Sq, Sk, coff, {fp8[1]}{self.op_tile_params()}BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr{fp8[2]}):",
        ]
        return head + [_ind(body)] + [""]

    def fwd_kernel(self):
        spec = self.spec
        if self.fp8:
            call = ("acc, l_i, m_i, vs_i = _fwd_tile_{tag}(acc, l_i, m_i, vs_i, q, k_base, v_base, skn, skd, svn,"
                    " svd, start_n, offs_m, Sq, Sk, coff, qs, KSb, VSb, sksn, svsn, "
                    f"{self.op_tile_params()}BLOCK_M, BLOCK_N, QBN)")
        else:
            call = ("acc, l_i, m_i = _fwd_tile_{tag}(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start_n,"
                    f" offs_m, Sq, Sk, coff, {self.op_tile_params()}BLOCK_M, BLOCK_N)")
        fill = "float('nan')" if self.nan_mode else "0.0"
        if self.scale is not None:
            lse = "(m_i + tl.math.log2(l_safe)) * 0.6931471805599453"
        else:
            lse = "m_i + tl.log(l_safe)"
        body = self.pids() + [
            "q_base = Q + b64 * sqb + h64 * sqh",
            "k_base = K + b64 * skb + hk64 * skh",
            "v_base = V + b64 * svb + hk64 * svh",
        ] + self.op_bases() + [
            "m0 = pid_m * BLOCK_M",
            "offs_m = m0 + tl.arange(0, BLOCK_M)",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            f"q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd"
            f"{_mask_kw('(offs_m[:, None] < Sq)', self.dmask and self.dmask + '[None, :]')})",
        ] + ([
            "qs = tl.load(QS + b64 * sqsb + h64 * sqsh + (m0 // QBM) * sqsn)",
            "KSb = KS + b64 * sksb + hk64 * sksh",
            "VSb = VS + b64 * svsb + hk64 * svsh",
            "vs_i = qs * 0.0 + 1.0",
        ] if self.fp8 else []) + [
            "m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)",
            "l_i = tl.zeros([BLOCK_M], tl.float32)",
            f"acc = tl.zeros([BLOCK_M, {spec.BDV}], tl.float32)",
            "lo, a, b, hi = _kv_blocks(m0, Sq, Sk, coff, BLOCK_M, BLOCK_N)",
            *self.block_runs("start_n", "BLOCK_N", call),
            "empty = m_i == float('-inf')",
            "l_safe = tl.where(empty, 1.0, l_i)",
            f"out = acc * (vs_i * {1.0 / P_SCALE!r}) / l_safe[:, None]" if self.fp8 else "out = acc / l_safe[:, None]",
            f"out = tl.where(empty[:, None], {fill}, out)",
            f"lse = tl.where(empty, float('-inf'), {lse})",
            "row_ok = offs_m < Sq",
            f"tl.store(O + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, "
            f"out.to(O.dtype.element_ty), mask={_and('row_ok[:, None]', self.dvmask and self.dvmask + '[None, :]')})",
            "tl.store(LSE + b64 * slb + h64 * slh + offs_m * slm, lse, mask=row_ok)",
        ]
        fp8 = ("QS, KS, VS, sqsb, sqsh, sqsn, sksb, sksh, sksn, svsb, svsh, svsn, ",
               ", QBM: tl.constexpr, QBN: tl.constexpr") if self.fp8 else ("", "")
        head = [
            '@triton.jit(do_not_specialize=["Sq", "Sk", "coff", "slb", "slh"])',
            f"def attn_fwd(Q, K, V, O, LSE, {fp8[0]}{self.op_kernel_params()}"
            "sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm, "
            f"Sq, Sk, coff, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr{fp8[1]}):",
        ]
        return head + [_ind(body)] + [""]

    def helpers(self):
        if self.spec.interpret:
            tanh = ["@triton.jit", "def _tanh(x):",
                    "    t = tl.exp(-2.0 * tl.abs(x))",
                    "    r = (1.0 - t) / (1.0 + t)",
                    "    return tl.where(x < 0, -r, r)", ""]
        else:
            tanh = ["@triton.jit", "def _tanh(x):", "    return libdevice.tanh(x)", ""]
        return tanh + ["@triton.jit", "def _sigmoid(x):", "    return tl.sigmoid(x)", ""]

    def module(self):
        out = ["import triton", "import triton.language as tl"]
        if self.fp8:
            out.append("from fa3_inductor.kernels.fp8_quant_kernel import to_e4m3")
        if not self.spec.interpret:
            out.append("from triton.language.extra import libdevice")
        out.append("")
        if self.spec.interpret:
            out += ["", "def _ix(t):", "    return int(getattr(t, 'handle', t).data.reshape(-1)[0]) "
                    "if hasattr(t, 'handle') else int(t)", ""]
        out += self.helpers()
        if self.spec.variant == "decode":
            return "\n".join(out + self.decode_module_body()) + "\n"
        out += self.ranges()
        out += self.fwd_tile(True) + self.fwd_tile(False) + self.fwd_kernel()
        if self.fp8:                # the backward of an FP8 forward is the 16-bit backward
            return "\n".join(out) + "\n"
        out += self.bwd_pre() + self.dkdv_tiles() + self.dkdv_kernel()
        out += self.dq_tile(True) + self.dq_tile(False) + self.dq_kernel()
        if self.uniform_mode:
            out += self.uniform_kernel()
        if self.imprecise_mode:
            out += self.imprecise_kernel()
        return "\n".join(out) + "\n"


def generate(spec: KernelSpec) -> str:
    if spec.variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {spec.variant!r}; have {VARIANTS}")
    return _Gen(spec).module()
