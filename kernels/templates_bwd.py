"""Text of the generated backward kernels (attn_bwd_pre, attn_bwd_dkdv, attn_bwd_dq); see templates.py.

A mixin of templates._Gen: it uses the generator's spec, program facts and shared pieces (score_lines,
exp_p, visible, op_bases, pids, rng).
"""

from __future__ import annotations

from .codegen import Emitter


def _ind(lines, n=4):
    pad = " " * n
    return "\n".join(pad + ln if ln else ln for ln in lines)


def _and(*parts):
    parts = [p for p in parts if p]
    return " & ".join(parts) if parts else None


def _mask_kw(*parts, other="0.0"):
    m = _and(*parts)
    return f", mask={m}, other={other}" if m else ""


class BackwardKernels:
    """Backward kernel text; mixed into templates._Gen."""

    def bwd_pre(self):
        spec = self.spec
        body = [
            "pid_m = tl.program_id(0)",
            "off_h = tl.program_id(1)",
            "off_b = tl.program_id(2)",
            "b64 = off_b.to(tl.int64)",
            "h64 = off_h.to(tl.int64)",
            "offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "row_ok = offs_m < Sq",
            f"mask = {_and('row_ok[:, None]', self.dvmask and self.dvmask + '[None, :]')}",
            "o = tl.load(O + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, mask=mask, "
            "other=0.0).to(tl.float32)",
            "do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod, "
            "mask=mask, other=0.0).to(tl.float32)",
            "delta = tl.sum(o * do, 1)",
            "tl.store(DELTA + (b64 * H + h64) * Sq + offs_m, delta, mask=row_ok)",
        ]
        if self.nan_mode:
            body += [
                "lse = tl.load(LSE + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=0.0)",
                "e = tl.max((row_ok & (lse == float('-inf'))).to(tl.int32), 0)",
                f"tl.atomic_max(FLAG + off_b * (H // {spec.G}) + off_h // {spec.G}, e)",
            ]
        elif self.uniform_mode:     # the work list of attn_bwd_uniform (templates_uniform.py)
            body += self.uniform_pre_lines()
        if self.imprecise_mode:     # the lse the gradient kernels read, attn_bwd_imprecise's work list
            body += self.imprecise_pre_lines(self.nan_mode or self.uniform_mode)
        head = [
            '@triton.jit(do_not_specialize=["Sq", "slb", "slh"])',
            f"def attn_bwd_pre(O, DO, LSE, DELTA, FLAG, {'LSEK, ' if self.imprecise_mode else ''}sob, soh, som, "
            "sod, sdob, sdoh, sdom, sdod, slb, slh, slm, Sq, H, BLOCK_M: tl.constexpr):",
        ]
        return head + [_ind(body)] + [""]

    def dkdv_tile(self, masked: bool, part: str = "dkdv"):
        """One query block's contribution to a key block: part "dkdv" updates dK and dV (4 GEMMs), "dv" only dV
        (S, then P·dO: 2 GEMMs), "dk" only dK (S, dP, then dS·Q: 3 GEMMs)."""
        spec = self.spec
        tag = ("masked" if masked else "full") + ("" if part == "dkdv" else "_" + part)
        em = Emitter(spec, "sT", "qi", "kj", "(qi < Sq)" if masked else None, "(kj < Sk)" if masked else None)
        xl, dloc, _ = self.score_lines(em, "sT", want_dscore=True)
        rowm = "(offs_m[None, :] < Sq)" if masked else None
        body = [
            "offs_m = start_m + tl.arange(0, BLOCK_M)",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "qi = offs_m[None, :]",
            "kj = offs_n[:, None]",
            f"qT = tl.load(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd"
            f"{_mask_kw(rowm, self.dmask and self.dmask + '[:, None]')})",
            f"do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod"
            f"{_mask_kw(masked and '(offs_m[:, None] < Sq)', self.dvmask and self.dvmask + '[None, :]')})",
            f"lse = tl.load(lse_base + offs_m * slm{_mask_kw(masked and '(offs_m < Sq)', other='0.0')})",
            "lse = tl.where(lse == float('-inf'), float('inf'), lse)",
        ]
        if part != "dv":
            body.append(f"delta = tl.load(delta_base + offs_m{_mask_kw(masked and '(offs_m < Sq)', other='0.0')})")
        body += [f"sT = tl.dot(k, qT{self.prec})"] + xl
        if masked:
            body.append(f"valid = {_and('(qi < Sq)', '(kj < Sk)', *self.visible())}")
            body.append("x = tl.where(valid, x, float('-inf'))")
        ref = "(lse * 1.4426950408889634)[None, :]" if self.scale is not None else "lse[None, :]"
        body.append(f"pT = {self.exp_p('x', ref)}")
        if part != "dk":
            body.append(f"dv += tl.dot(pT.to({self.elt}), do{self.prec})")
        if part != "dv":
            body += [
                f"dpT = tl.dot(v, tl.trans(do){self.prec})",
                "dxT = pT * (dpT - delta[None, :])",
                "dxT = tl.where(pT == 0.0, 0.0, dxT)",
                f"dsT = dxT * {dloc}",
            ]
            if masked:
                body.append("dsT = tl.where(valid, dsT, 0.0)")
            body.append(f"dk += tl.dot(dsT.to({self.elt}), tl.trans(qT){self.prec})")
        accs = {"dkdv": ("dk, dv", "k, v"), "dv": ("dv", "k"), "dk": ("dk", "k, v")}[part]
        body.append(f"return {accs[0]}")
        head = [
            "@triton.jit",
            f"def _dkdv_tile_{tag}({accs[0]}, {accs[1]}, q_base, do_base, lse_base, delta_base, sqm, sqd, sdom, "
            f"sdod, slm, start_m, offs_n, Sq, Sk, coff, {self.op_tile_params()}BLOCK_M: tl.constexpr, "
            "BLOCK_N: tl.constexpr):",
        ]
        return head + [_ind(body)] + [""]

    def dkdv_tiles(self):
        out = []
        for part in ("dkdv", "dv", "dk"):
            out += self.dkdv_tile(True, part) + self.dkdv_tile(False, part)
        return out

    def dkdv_kernel(self):
        """attn_bwd_dkdv; the constexpr DV_BLOCK_M picks the schedule:
        0: one sweep over BLOCK_M-query blocks updating dK and dV together (4 GEMMs per tile, two fp32
           BLOCK_N x D accumulators live);
        > 0: a sweep over DV_BLOCK_M-query blocks for dV (S, P·dO), then one over BLOCK_M-query blocks for dK
           (S again, dP, dS·Q): 5 GEMMs per key/query pair instead of 4, but one accumulator live at a time, so
           128 keys fit 8 warps' registers at D=256 — and 128 rows is what Triton's layout for chained dots
           (all warps along M) needs to give each warpgroup its own 64 rows instead of computing S and dP twice.
           Only K is resident in the first sweep, so it can take larger query blocks than the second."""
        spec = self.spec
        colm = "(offs_n[:, None] < Sk)"
        args = ("q_base, do_base, lse_base, delta_base, sqm, sqd, sdom, sdod, slm, start_m, offs_n, Sq, Sk, coff, "
                f"{self.op_tile_params()}{{bm}}, BLOCK_N)")
        calls = {
            "dkdv": "dk, dv = _dkdv_tile_{tag}(dk, dv, k, v, " + args,
            "dv": "dv = _dkdv_tile_{tag}_dv(dv, k, " + args,
            "dk": "dk = _dkdv_tile_{tag}_dk(dk, k, v, " + args,
        }
        load_k = (f"k = tl.load(K + b64 * skb + hk64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd"
                  f"{_mask_kw(colm, self.dmask and self.dmask + '[None, :]')})")
        load_v = (f"v = tl.load(V + b64 * svb + hk64 * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd"
                  f"{_mask_kw(colm, self.dvmask and self.dvmask + '[None, :]')})")
        zero = {"dk": f"dk = tl.zeros([BLOCK_N, {spec.BD}], tl.float32)",
                "dv": f"dv = tl.zeros([BLOCK_N, {spec.BDV}], tl.float32)"}
        store = {
            "dk": f"tl.store(DK + b64 * sdkb + hk64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd, "
                  f"dk.to(DK.dtype.element_ty), mask={_and(colm, self.dmask and self.dmask + '[None, :]')})",
            "dv": f"tl.store(DV + b64 * sdvb + hk64 * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd, "
                  f"dv.to(DV.dtype.element_ty), mask={_and(colm, self.dvmask and self.dvmask + '[None, :]')})",
        }

        def sweep(part, bm="BLOCK_M"):
            """The loop over the group's query heads and their visible query blocks of bm rows."""
            inner = [
                f"off_h = off_hk * {spec.G} + g",
                "h64 = off_h.to(tl.int64)",
                "q_base = Q + b64 * sqb + h64 * sqh",
                "do_base = DO + b64 * sdob + h64 * sdoh",
                "lse_base = LSE + b64 * slb + h64 * slh",
                f"delta_base = DELTA + (b64 * (HK * {spec.G}) + h64) * Sq",
            ] + self.op_bases() + self.block_runs("start_m", bm, calls[part].replace("{bm}", bm))
            return ([f"lo, a, b, hi = _q_blocks(n0, Sq, Sk, coff, {bm}, BLOCK_N)", f"for g in range({spec.G}):"]
                    + ["    " + ln for ln in inner])

        def finish(accs):
            lines = []
            if self.nan_mode:
                lines.append("flag = tl.load(FLAG + off_b * HK + off_hk)")
                lines += [f"{a} = tl.where(flag != 0, float('nan'), {a})" for a in accs]
            return lines + [store[a] for a in accs]

        fused = [load_k, load_v, zero["dk"], zero["dv"]] + sweep("dkdv") + finish(("dk", "dv"))
        phased = ([load_k, zero["dv"]] + sweep("dv", "DV_BLOCK_M") + finish(("dv",))
                  + [load_v, zero["dk"]] + sweep("dk") + finish(("dk",)))
        body = [
            "pid_n = tl.program_id(0)",
            "off_hk = tl.program_id(1)",
            "off_b = tl.program_id(2)",
            "HK = tl.num_programs(1)",
            "b64 = off_b.to(tl.int64)",
            "hk64 = off_hk.to(tl.int64)",
            "n0 = pid_n * BLOCK_N",
            "offs_n = n0 + tl.arange(0, BLOCK_N)",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "if DV_BLOCK_M > 0:",
        ] + ["    " + ln for ln in phased] + ["else:"] + ["    " + ln for ln in fused]
        head = [
            '@triton.jit(do_not_specialize=["Sq", "Sk", "coff", "slb", "slh"])',
            f"def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, FLAG, DK, DV, {self.op_kernel_params()}"
            "sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod, slb, slh, slm, "
            "sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, Sq, Sk, coff, "
            "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DV_BLOCK_M: tl.constexpr):",
        ]
        return head + [_ind(body)] + [""]

    def dq_tile(self, masked: bool):
        spec = self.spec
        tag = "masked" if masked else "full"
        em = Emitter(spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)" if masked else None)
        xl, dloc, dops = self.score_lines(em, "s", want_dscore=True, operand_grads=self.grad_ops)
        colm = "(offs_n[None, :] < Sk)" if masked else None
        body = [
            "offs_n = start_n + tl.arange(0, BLOCK_N)",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "qi = offs_m[:, None]",
            "kj = offs_n[None, :]",
            f"kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd"
            f"{_mask_kw(colm, self.dmask and self.dmask + '[:, None]')})",
            f"vT = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd"
            f"{_mask_kw(colm, self.dvmask and self.dvmask + '[:, None]')})",
            f"s = tl.dot(q, kT{self.prec})",
        ]
        body += xl
        if masked:
            body.append(f"valid = {_and('(qi < Sq)', '(kj < Sk)', *self.visible())}")
            body.append("x = tl.where(valid, x, float('-inf'))")
        ref = "(lse * 1.4426950408889634)[:, None]" if self.scale is not None else "lse[:, None]"
        body += [
            f"p = {self.exp_p('x', ref)}",
            f"dp = tl.dot(do, vT{self.prec})",
            "dx = p * (dp - delta[:, None])",
            "dx = tl.where(p == 0.0, 0.0, dx)",
            f"ds = dx * {dloc}",
        ]
        if masked:
            body.append("ds = tl.where(valid, ds, 0.0)")
        body.append(f"dq += tl.dot(ds.to({self.elt}), tl.trans(kT){self.prec})")
        for n in self.grad_ops:
            val = f"dx * {dops[n]}"
            if masked:
                val = f"tl.where(valid, {val}, 0.0)"
            body.append(f"tl.store(DOP{n}b + qi.to(tl.int64) * dst{n}_m + kj * dst{n}_n, {val}, "
                        f"mask={_and('(qi < Sq)', masked and '(kj < Sk)')})")
        body.append("return dq")
        head = [
            "@triton.jit",
            f"def _dq_tile_{tag}(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, start_n, offs_m, Sq, "
            f"Sk, coff, {self.op_tile_params()}{self.dop_tile_params()}BLOCK_M: tl.constexpr, "
            "BLOCK_N: tl.constexpr):",
        ]
        return head + [_ind(body)] + [""]

    def dq_kernel(self):
        spec = self.spec
        call = ("dq = _dq_tile_{tag}(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, start_n, offs_m,"
                f" Sq, Sk, coff, {self.op_tile_params()}{self.dop_tile_params()}BLOCK_M, BLOCK_N)")
        body = self.pids() + [
            "q_base = Q + b64 * sqb + h64 * sqh",
            "k_base = K + b64 * skb + hk64 * skh",
            "v_base = V + b64 * svb + hk64 * svh",
        ] + self.op_bases(grads=True) + [
            "m0 = pid_m * BLOCK_M",
            "offs_m = m0 + tl.arange(0, BLOCK_M)",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "row_ok = offs_m < Sq",
            f"q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd"
            f"{_mask_kw('row_ok[:, None]', self.dmask and self.dmask + '[None, :]')})",
            f"do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod"
            f"{_mask_kw('row_ok[:, None]', self.dvmask and self.dvmask + '[None, :]')})",
            "lse_raw = tl.load(LSE + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=0.0)",
            "lse = tl.where(lse_raw == float('-inf'), float('inf'), lse_raw)",
            "delta = tl.load(DELTA + (b64 * H + h64) * Sq + offs_m, mask=row_ok, other=0.0)",
            f"dq = tl.zeros([BLOCK_M, {spec.BD}], tl.float32)",
            "lo, a, b, hi = _kv_blocks(m0, Sq, Sk, coff, BLOCK_M, BLOCK_N)",
            *self.block_runs("start_n", "BLOCK_N", call),
        ]
        if self.nan_mode:
            body.append("dq = tl.where((lse_raw == float('-inf'))[:, None], float('nan'), dq)")
        body.append(
            f"tl.store(DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd, "
            f"dq.to(DQ.dtype.element_ty), mask={_and('row_ok[:, None]', self.dmask and self.dmask + '[None, :]')})")
        head = [
            '@triton.jit(do_not_specialize=["Sq", "Sk", "coff", "slb", "slh"])',
            f"def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, {self.op_kernel_params()}{self.dop_kernel_params()}"
            "sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod, slb, slh, slm, "
            "sdqb, sdqh, sdqm, sdqd, Sq, Sk, H, coff, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        ]
        return head + [_ind(body)] + [""]

    def block_runs(self, var, step, call):
        """The three loops over a [lo, hi) block range: masked [lo, a), unmasked [a, b), masked [b, hi)."""
        out = []
        for lo, hi, tag in (("lo", "a", "masked"), ("a", "b", "full"), ("b", "hi", "masked")):
            out += [f"for {var} in {self.rng(lo, hi, step)}:", "    " + call.format(tag=tag)]
        return out

    def rng(self, lo, hi, step):
        if self.spec.interpret:  # the interpreter's scalars are 1-element arrays, which range() rejects
            return f"range(_ix({lo}), _ix({hi}), {step})"
        return f"range({lo}, {hi}, {step})"
