"""Text of attn_bwd_uniform, the backward of the rows empty_row="uniform" fills (see templates.py).

A row with no visible key (lse = -inf) takes p = 1/Sk on every key and out = mean of v; its gradient goes
through `unmasked(expr)` as reference.uniform_rows_grads computes it:

    delta_i = dO_i · vmean                       (vmean: fp32 mean of v over all keys)
    u_ij    = (dO_i · v_j − delta_i) · ∂unmasked(expr)/∂s (s_ij)
    dq_i   += (1/Sk) Σ_j u_ij k_j
    dk_j   += (1/Sk) Σ_i u_ij q_i                (i over the empty rows of the G query heads of the group)
    dv_j   += (1/Sk) Σ_i dO_i                    (the same for every key j)
    d(operand)_ij += (1/Sk)(dO_i · v_j − delta_i) · ∂unmasked(expr)/∂operand (s_ij)

The 1/Sk multiplies the fp32 results of the dots, not their 16-bit inputs (long key axes would push those
towards subnormals).

Work list (no host sync, and next to no work when no row is empty). attn_bwd_pre, one program per (query
block of PRE_M rows, head, batch), appends to an int32 buffer WORK what it finds:
    WORK[0, NG)               per (batch, kv head) group: 1 once a row of the group is empty (NG = B·Hkv)
    WORK[NG], WORK[NG + 1]    counts: query blocks with an empty row, groups with an empty row
    WORK[NG + 2, 2NG + 2)     the groups, b·Hkv + hkv
    WORK[2NG + 2, ...)        the query blocks, (b·H + h)·NUM_PRE + block
attn_bwd_uniform then runs a fixed 1-D grid of programs that stride over the items
    [0, n_blocks)                       one query block: dQ of its empty rows and their d(operand) tiles
    [n_blocks, n_blocks + n_groups·NUM_N) one (group, key block): dK and dV of those keys over every empty row
                                        of the group's G heads (query blocks without one are skipped)
so with no empty row each program reads two counts and ends. It runs after attn_bwd_dkdv and attn_bwd_dq and
updates their outputs in place (read, add in fp32, round once: as adding the reference's fp32 correction did)
and the (B, H, Sq, Sk) fp32 d(operand) buffers attn_bwd_dq wrote. Every output element has one owner item,
computed the same way whichever program takes it: no atomics on outputs, deterministic.
"""

from __future__ import annotations

from .codegen import Emitter
from .program import derivative, unmasked
from .templates_bwd import _and, _mask_kw


def _nest(lines, n=4):
    """Indent lines (an entry may hold several) by n spaces, as a flat list."""
    pad = " " * n
    return [pad + ln if ln else ln for text in lines for ln in text.split("\n")]


def _uses_score(e) -> bool:
    if e[0] == "score":
        return True
    return any(_uses_score(a) for a in e[1:] if isinstance(a, tuple))


_STRIDES = ("sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod, slb, slh, slm, "
            "sdqb, sdqh, sdqm, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, ")


class UniformRowKernels:
    """attn_bwd_uniform's text and bwd_pre's work-list lines; mixed into templates._Gen."""

    def uniform_pre_lines(self):
        """attn_bwd_pre's part (needs lse, row_ok, pid_m, off_h, off_b, H, FLAG = WORK): flag the group, list
        the group the first time and the query block when it has an empty row."""
        G = self.spec.G
        return [
            "lse = tl.load(LSE + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=0.0)",
            "e = tl.max((row_ok & (lse == float('-inf'))).to(tl.int32), 0)",
            "has = e != 0",
            f"grp = off_b * (H // {G}) + off_h // {G}",
            f"NG = tl.num_programs(2) * (H // {G})",
            "seen = tl.atomic_max(FLAG + grp, e, mask=has)",
            "first = has & (seen == 0)",
            "gslot = tl.atomic_add(FLAG + NG + 1, 1, mask=first)",
            "tl.store(FLAG + NG + 2 + gslot, grp, mask=first)",
            "rslot = tl.atomic_add(FLAG + NG, 1, mask=has)",
            "tl.store(FLAG + 2 * NG + 2 + rslot, (off_b * H + off_h) * tl.num_programs(0) + pid_m, mask=has)",
        ]

    def _uniform_derivatives(self, em: Emitter, s: str, qk_dot: str):
        """Lines (the score tile when a derivative needs it, then the derivative tiles), d/ds text,
        {n: d/d(operand n) text}."""
        y = unmasked(self.prog.expr)
        d_score = derivative(y, ("score",))
        d_ops = {n: derivative(y, ("operand", n)) for n in self.grad_ops}
        need_s = any(_uses_score(e) for e in [d_score, *d_ops.values()])
        dloc = em._float(em.emit(d_score))
        dops = {n: em._float(em.emit(e)) for n, e in d_ops.items()}
        return ([f"{s} = {qk_dot}"] if need_s else []) + em.lines, dloc, dops

    def _vmean_lines(self):
        """fp32 mean of v over all Sk keys at v_base (as reference.uniform_fill / uniform_rows_grads)."""
        return [
            f"vsum = tl.zeros([{self.spec.BDV}], tl.float32)",
            f"for start_n in {self.rng('0', 'Sk', 'BLOCK_N')}:",
            "    offs_vn = start_n + tl.arange(0, BLOCK_N)",
            f"    vt = tl.load(v_base + offs_vn[:, None] * svn + offs_dv[None, :] * svd"
            f"{_mask_kw('(offs_vn[:, None] < Sk)', self.dvmask and self.dvmask + '[None, :]')})",
            "    vsum += tl.sum(vt.to(tl.float32), 0)",
            "vmean = vsum * inv_sk",
        ]

    def _dq_block(self):
        """dQ (and d operand) of the empty rows among [start_m, start_m + BLOCK_M) of head off_h."""
        spec = self.spec
        em = Emitter(spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)", prefix="ue")
        lines, dloc, dops = self._uniform_derivatives(em, "s", f"tl.dot(q, kT{self.prec})")
        dm = self.dmask and self.dmask + "[None, :]"
        inner = [
            "offs_n = start_n + tl.arange(0, BLOCK_N)",
            "kj = offs_n[None, :]",
            f"kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd"
            f"{_mask_kw('(kj < Sk)', self.dmask and self.dmask + '[:, None]')})",
            f"vT = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd"
            f"{_mask_kw('(kj < Sk)', self.dvmask and self.dvmask + '[:, None]')})",
            *lines,
            f"dpd = tl.dot(do, vT{self.prec}) - delta[:, None]",
            "live = empty[:, None] & (kj < Sk)",
            f"u = tl.where(live, dpd * {dloc}, 0.0)",
            f"dq += tl.dot(u.to({self.elt}), tl.trans(kT){self.prec})",
        ]
        for n in self.grad_ops:
            inner += [
                f"dptr{n} = DOP{n}b + qi.to(tl.int64) * dst{n}_m + kj * dst{n}_n",
                f"dold{n} = tl.load(dptr{n}, mask=live, other=0.0)",
                f"tl.store(dptr{n}, dold{n} + (dpd * inv_sk) * {dops[n]}, mask=live)",
            ]
        work = [
            f"hk64 = (off_h // {spec.G}).to(tl.int64)",
            "k_base = K + b64 * skb + hk64 * skh",
            "v_base = V + b64 * svb + hk64 * svh",
            *self.op_bases(grads=True),
            "qi = offs_m[:, None]",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            f"q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd"
            f"{_mask_kw('row_ok[:, None]', dm)})",
            f"do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod"
            f"{_mask_kw('row_ok[:, None]', self.dvmask and self.dvmask + '[None, :]')})",
            "delta = tl.sum(do.to(tl.float32) * vmean[None, :], 1)",
            f"dq = tl.zeros([BLOCK_M, {spec.BD}], tl.float32)",
            f"for start_n in {self.rng('0', 'Sk', 'BLOCK_N')}:",
            *_nest(inner),
            "dq_ptr = DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd",
            f"dq_mask = {_and('empty[:, None]', dm)}",
            "dq_old = tl.load(dq_ptr, mask=dq_mask, other=0.0).to(tl.float32)",
            "tl.store(dq_ptr, (dq_old + dq * inv_sk).to(DQ.dtype.element_ty), mask=dq_mask)",
        ]
        body = [
            "b64 = off_b.to(tl.int64)",
            "h64 = off_h.to(tl.int64)",
            "offs_m = start_m + tl.arange(0, BLOCK_M)",
            "row_ok = offs_m < Sq",
            "lse = tl.load(LSE + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=0.0)",
            "empty = row_ok & (lse == float('-inf'))",
            "if tl.max(empty.to(tl.int32), 0) != 0:",
            *_nest(work),
        ]
        head = [
            "@triton.jit",
            f"def _uniform_dq_block(Q, K, V, DO, LSE, DQ, {self.op_kernel_params()}{self.dop_kernel_params()}"
            f"{_STRIDES}vmean, off_b, off_h, start_m, Sq, Sk, inv_sk, BLOCK_M: tl.constexpr, "
            "BLOCK_N: tl.constexpr):",
        ]
        return head + _nest(body) + [""]

    def _dkdv_block(self):
        """dK, dV of keys [n0, n0 + BLOCK_N) of kv head off_hk over every empty row of its G query heads."""
        spec = self.spec
        em = Emitter(spec, "sT", "qi", "kj", "(qi < Sq)", "(kj < Sk)", prefix="ue")
        lines, dloc, _ = self._uniform_derivatives(em, "sT", f"tl.dot(k, qT{self.prec})")
        blk = [
            f"qT = tl.load(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd"
            f"{_mask_kw('(qi < Sq)', self.dmask and self.dmask + '[:, None]')})",
            f"do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod"
            f"{_mask_kw('(offs_m[:, None] < Sq)', self.dvmask and self.dvmask + '[None, :]')})",
            "dof = do.to(tl.float32)",
            "delta = tl.sum(dof * vmean[None, :], 1)",
            "dosum += tl.sum(tl.where(empty[:, None], dof, 0.0), 0)",
            *lines,
            f"dpd = tl.dot(v, tl.trans(do){self.prec}) - delta[None, :]",
            f"uT = tl.where(empty[None, :] & (kj < Sk), dpd * {dloc}, 0.0)",
            f"dk += tl.dot(uT.to({self.elt}), tl.trans(qT){self.prec})",
        ]
        per_block = [
            "offs_m = start_m + tl.arange(0, BLOCK_M)",
            "qi = offs_m[None, :]",
            "lse = tl.load(lse_base + offs_m * slm, mask=offs_m < Sq, other=0.0)",
            "empty = (offs_m < Sq) & (lse == float('-inf'))",
            "if tl.max(empty.to(tl.int32), 0) != 0:",
            *_nest(blk),
        ]
        per_head = [
            f"h64 = (off_hk * {spec.G} + g).to(tl.int64)",
            "q_base = Q + b64 * sqb + h64 * sqh",
            "do_base = DO + b64 * sdob + h64 * sdoh",
            "lse_base = LSE + b64 * slb + h64 * slh",
            *self.op_bases(),
            f"for start_m in {self.rng('0', 'Sq', 'BLOCK_M')}:",
            *_nest(per_block),
        ]
        dm = self.dmask and self.dmask + "[None, :]"
        dvm = self.dvmask and self.dvmask + "[None, :]"
        body = [
            "b64 = off_b.to(tl.int64)",
            "hk64 = off_hk.to(tl.int64)",
            "offs_n = n0 + tl.arange(0, BLOCK_N)",
            "kj = offs_n[:, None]",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "k_base = K + b64 * skb + hk64 * skh",
            "v_base = V + b64 * svb + hk64 * svh",
            f"k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd{_mask_kw('(kj < Sk)', dm)})",
            f"v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd{_mask_kw('(kj < Sk)', dvm)})",
            *self._vmean_lines(),
            f"dk = tl.zeros([BLOCK_N, {spec.BD}], tl.float32)",
            f"dosum = tl.zeros([{spec.BDV}], tl.float32)",
            f"for g in range({spec.G}):",
            *_nest(per_head),
            "dk_ptr = DK + b64 * sdkb + hk64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd",
            f"dk_mask = {_and('(kj < Sk)', dm)}",
            "dk_old = tl.load(dk_ptr, mask=dk_mask, other=0.0).to(tl.float32)",
            "tl.store(dk_ptr, (dk_old + dk * inv_sk).to(DK.dtype.element_ty), mask=dk_mask)",
            "dv_ptr = DV + b64 * sdvb + hk64 * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd",
            f"dv_mask = {_and('(kj < Sk)', dvm)}",
            "dv_old = tl.load(dv_ptr, mask=dv_mask, other=0.0).to(tl.float32)",
            "tl.store(dv_ptr, (dv_old + (dosum * inv_sk)[None, :]).to(DV.dtype.element_ty), mask=dv_mask)",
        ]
        head = [
            "@triton.jit",
            f"def _uniform_dkdv_block(Q, K, V, DO, LSE, DK, DV, {self.op_kernel_params()}{_STRIDES}"
            "off_b, off_hk, n0, Sq, Sk, inv_sk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        ]
        return head + _nest(body) + [""]

    def uniform_kernel(self):
        spec = self.spec
        ops = self.op_kernel_params()
        dq_call = (f"_uniform_dq_block(Q, K, V, DO, LSE, DQ, {ops}{self.dop_kernel_params()}{_STRIDES}vmean, "
                   "off_b, off_h, start_m, Sq, Sk, inv_sk, BLOCK_M, BLOCK_N)")
        dkdv_call = (f"_uniform_dkdv_block(Q, K, V, DO, LSE, DK, DV, {ops}{_STRIDES}grp // (H // {spec.G}), "
                     f"grp % (H // {spec.G}), (w2 % NUM_N) * BLOCK_N, Sq, Sk, inv_sk, BLOCK_M, BLOCK_N)")
        row_item = [
            "item = tl.load(WORK + 2 * NG + 2 + w)",
            "bh = item // NUM_PRE",
            "off_b = bh // H",
            "off_h = bh % H",
            "m0 = (item % NUM_PRE) * PRE_M",
            f"v_base = V + off_b.to(tl.int64) * svb + (off_h // {spec.G}).to(tl.int64) * svh",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            *self._vmean_lines(),
            f"for start_m in {self.rng('m0', 'm0 + PRE_M', 'BLOCK_M')}:",
            "    " + dq_call,
        ]
        group_item = [
            "w2 = w - n_blocks",
            "grp = tl.load(WORK + NG + 2 + w2 // NUM_N)",
            dkdv_call,
        ]
        nprog = "_ix(tl.num_programs(0))" if spec.interpret else "tl.num_programs(0)"
        body = [
            "n_blocks = tl.load(WORK + NG)",
            "total = n_blocks + tl.load(WORK + NG + 1) * NUM_N",
            "inv_sk = 1.0 / Sk.to(tl.float32)",
            f"for w in {self.rng('tl.program_id(0)', 'total', nprog)}:",
            "    if w < n_blocks:",
            *_nest(row_item, 8),
            "    else:",
            *_nest(group_item, 8),
        ]
        head = [
            '@triton.jit(do_not_specialize=["Sq", "Sk", "NG", "NUM_PRE", "NUM_N", "slb", "slh"])',
            f"def attn_bwd_uniform(Q, K, V, DO, LSE, WORK, DQ, DK, DV, {ops}{self.dop_kernel_params()}{_STRIDES}"
            "Sq, Sk, H, NG, NUM_PRE, NUM_N, PRE_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        ]
        return self._dq_block() + self._dkdv_block() + head + _nest(body) + [""]
