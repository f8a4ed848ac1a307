"""Text of the special-row backward kernels: attn_bwd_uniform (the rows empty_row="uniform" fills) and
attn_bwd_imprecise (rows whose fp32 lse lost log l), one family: the same work list, the same strided driver,
the same per-item structure, with the row's probability as the rule that differs.

Uniform rows. A row with no visible key (lse = -inf) takes p = 1/Sk on every key and out = mean of v; its
gradient goes through `unmasked(expr)` as reference.uniform_rows_grads computes it:

    delta_i = dO_i · vmean                       (vmean: fp32 mean of v over all keys)
    u_ij    = (dO_i · v_j − delta_i) · ∂unmasked(expr)/∂s (s_ij)
    dq_i   += (1/Sk) Σ_j u_ij k_j
    dk_j   += (1/Sk) Σ_i u_ij q_i                (i over the empty rows of the G query heads of the group)
    dv_j   += (1/Sk) Σ_i dO_i                    (the same for every key j)
    d(operand)_ij += (1/Sk)(dO_i · v_j − delta_i) · ∂unmasked(expr)/∂operand (s_ij)

The 1/Sk multiplies the fp32 results of the dots, not their 16-bit inputs (long key axes would push those
towards subnormals).

Imprecise rows. Where every score of a row is an enormous fill (a dense mask adding finfo.min or -1e9), the
forward's online softmax is exact but its fp32 lse = m + log l rounds to m (|lse| > reference.IMPRECISE_LSE),
so p = exp(x − lse) in attn_bwd_dkdv / attn_bwd_dq would be wrong. attn_bwd_pre writes the lse those kernels
read with +inf on such rows (they skip them: p = 0) and lists the rows' query blocks and groups; then
attn_bwd_imprecise runs twice, PART a constexpr:
    PART 1, per listed query block: m_i = max_j x_ij, l_i = Σ_j exp(x_ij − m_i) over the visible keys (x by the
            full program, as the forward computes it), kept beside delta (DELTA holds delta, m, l); then
            p_ij = exp(x_ij − m_i) / l_i and, with delta_i = dO_i · out_i from attn_bwd_pre,
                w_ij = p_ij (dO_i · v_j − delta_i)
                dq_i += Σ_j w_ij ∂expr/∂s k_j,   d(operand)_ij += w_ij ∂expr/∂operand
    PART 2, per listed (group, key block): dk_j += Σ_i w_ij ∂expr/∂s q_i, dv_j += Σ_i p_ij dO_i over the imprecise
            rows of the group's G heads (m, l of PART 1).
PART 2 needs every row's m, l, which PART 1 items compute concurrently: hence two launches, not one.

Work lists (no host sync, and next to no work when there is no such row). attn_bwd_pre, one program per
(query block of PRE_M rows, head, batch), appends to an int32 list at WORK what it finds:
    WORK[0, NG)               per (batch, kv head) group: 1 once a row of the group is listed (NG = B·Hkv)
    WORK[NG], WORK[NG + 1]    counts: query blocks with a listed row, groups with a listed row
    WORK[NG + 2, 2NG + 2)     the groups, b·Hkv + hkv
    WORK[2NG + 2, ...)        the query blocks, (b·H + h)·NUM_PRE + block
in the FLAG buffer: the uniform rows' list at 0, the imprecise rows' list after attn_bwd_pre's other use of
FLAG (the NG per-group flags of empty_row="nan", the uniform list). The kernels then run a fixed 1-D grid of
programs that stride over the items
    [0, n_blocks)                       one query block: dQ of its listed rows and their d(operand) tiles
    [n_blocks, n_blocks + n_groups·NUM_N) one (group, key block): dK and dV of those keys over every listed row
                                        of the group's G heads (query blocks without one are skipped)
(attn_bwd_uniform takes both kinds in one launch, attn_bwd_imprecise one kind per PART), so with no listed row
each program reads a count or two and ends. They run after attn_bwd_dkdv and attn_bwd_dq (or the Hopper
warp-specialized backward) and update their outputs in place (read, add in fp32, round once) and the
(B, H, Sq, Sk) fp32 d(operand) buffers attn_bwd_dq wrote. Every output element has one owner item, computed
the same way whichever program takes it: no atomics on outputs, deterministic.
"""

from __future__ import annotations

from .codegen import Emitter
from .program import derivative, unmasked
from .reference import IMPRECISE_LSE
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
    """attn_bwd_uniform / attn_bwd_imprecise text and attn_bwd_pre's work-list lines; mixed into templates._Gen.
    rule: "uniform" or "imprecise" (module docstring)."""

    def _list_lines(self, flagged: str, work: str, tag: str = ""):
        """attn_bwd_pre's lines that list this program's query block and its group in the work list at `work`
        when the int32 scalar `flagged` is nonzero (needs pid_m, off_h, off_b, H)."""
        G = self.spec.G
        has, grp, ng, first = f"has{tag}", f"grp{tag}", f"NG{tag}", f"first{tag}"
        return [
            f"{has} = {flagged} != 0",
            f"{grp} = off_b * (H // {G}) + off_h // {G}",
            f"{ng} = tl.num_programs(2) * (H // {G})",
            f"seen{tag} = tl.atomic_max({work} + {grp}, {flagged}, mask={has})",
            f"{first} = {has} & (seen{tag} == 0)",
            f"gslot{tag} = tl.atomic_add({work} + {ng} + 1, 1, mask={first})",
            f"tl.store({work} + {ng} + 2 + gslot{tag}, {grp}, mask={first})",
            f"rslot{tag} = tl.atomic_add({work} + {ng}, 1, mask={has})",
            f"tl.store({work} + 2 * {ng} + 2 + rslot{tag}, (off_b * H + off_h) * tl.num_programs(0) + pid_m, "
            f"mask={has})",
        ]

    def uniform_pre_lines(self):
        """attn_bwd_pre's part (needs lse, row_ok, pid_m, off_h, off_b, H, FLAG = WORK): flag the group, list
        the group the first time and the query block when it has an empty row."""
        return [
            "lse = tl.load(LSE + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=0.0)",
            "e = tl.max((row_ok & (lse == float('-inf'))).to(tl.int32), 0)",
        ] + self._list_lines("e", "FLAG")

    def imprecise_pre_lines(self, lse_loaded: bool):
        """attn_bwd_pre's part for programs that can have imprecise rows: the lse the gradient kernels read
        (LSEK, contiguous like DELTA: +inf on imprecise rows, which they then skip) and the imprecise rows'
        work list, placed after FLAG's other use (_imprecise_list)."""
        G = self.spec.G
        lines = [] if lse_loaded else [
            "lse = tl.load(LSE + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=0.0)"]
        lines += [
            "alse = tl.abs(lse)",
            f"imp = row_ok & (alse > {IMPRECISE_LSE!r}) & (alse < float('inf'))",
            "tl.store(LSEK + (b64 * H + h64) * Sq + offs_m, tl.where(imp, float('inf'), lse), mask=row_ok)",
            "ie = tl.max(imp.to(tl.int32), 0)",
            f"IW = FLAG + {self._imprecise_list(f'tl.num_programs(2) * (H // {G})', 'tl.num_programs(0)')}",
        ]
        return lines + self._list_lines("ie", "IW", "_i")

    def _imprecise_list(self, ng: str, num_pre: str) -> str:
        """Offset in FLAG of the imprecise rows' work list (after the "nan" group flags or the uniform list)."""
        if self.nan_mode:
            return ng
        if self.uniform_mode:
            return f"2 * {ng} + 2 + {num_pre} * {ng} * {self.spec.G}"
        return "0"

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

    def _masked_scores(self, em: Emitter, s: str, qk_dot: str, grads: bool):
        """Lines computing x as the forward does (the whole program, -inf outside the visible, in-bounds tile:
        `valid`), and with grads the derivative texts (d/ds, {n: d/d(operand n)})."""
        xl, dloc, dops = self.score_lines(em, s, want_dscore=grads, operand_grads=self.grad_ops if grads else ())
        valid = _and("(qi < Sq)", "(kj < Sk)", *self.visible())
        return [f"{s} = {qk_dot}", *xl, f"valid = {valid}", "x = tl.where(valid, x, float('-inf'))"], dloc, dops

    def _row_selection(self, rule: str, lse: str, in_bounds: str):
        """(name, line) of the rows a rule serves among those of a loaded lse."""
        if rule == "uniform":
            return "empty", f"empty = {in_bounds} & ({lse} == float('-inf'))"
        return "sel", (f"sel = {in_bounds} & (tl.abs({lse}) > {IMPRECISE_LSE!r}) & "
                       f"(tl.abs({lse}) < float('inf'))")

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

    def _row_stats_lines(self):
        """PART 1's first pass over the keys of the rows `sel` of a query block: m, l of their softmax, stored
        at DELTA + bhs / + 2·bhs (beside delta)."""
        em = Emitter(self.spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)", prefix="ie")
        lines, _, _ = self._masked_scores(em, "s", f"tl.dot(q, kT{self.prec})", grads=False)
        inner = [
            "offs_n = start_n + tl.arange(0, BLOCK_N)",
            "kj = offs_n[None, :]",
            f"kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd"
            f"{_mask_kw('(kj < Sk)', self.dmask and self.dmask + '[:, None]')})",
            *lines,
            "m_new = tl.maximum(m_i, tl.max(x, 1))",
            "m_use = tl.where(m_new == float('-inf'), 0.0, m_new)",
            f"l_i = l_i * {self.exp_p('m_i', 'm_use')} + tl.sum({self.exp_p('x', 'm_use[:, None]')}, 1)",
            "m_i = m_new",
        ]
        return [
            "m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)",
            "l_i = tl.zeros([BLOCK_M], tl.float32)",
            "lo, _a, _b, hi = _kv_blocks(start_m, Sq, Sk, coff, BLOCK_M, BLOCK_N)",
            f"for start_n in {self.rng('lo', 'hi', 'BLOCK_N')}:",
            *_nest(inner),
            "srow = (b64 * H + h64) * Sq + offs_m",
            "tl.store(DELTA + bhs + srow, m_i, mask=sel)",
            "tl.store(DELTA + 2 * bhs + srow, l_i, mask=sel)",
            "m_ref = tl.where(sel, m_i, 0.0)",
            "inv_l = 1.0 / tl.where(sel, l_i, 1.0)",
            "delta = tl.load(DELTA + srow, mask=sel, other=0.0)",
        ]

    def _dq_block(self, rule: str):
        """dQ (and d operand) of the rule's rows among [start_m, start_m + BLOCK_M) of head off_h."""
        spec = self.spec
        uniform = rule == "uniform"
        dm = self.dmask and self.dmask + "[None, :]"
        if uniform:
            em = Emitter(spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)", prefix="ue")
            lines, dloc, dops = self._uniform_derivatives(em, "s", f"tl.dot(q, kT{self.prec})")
            rows, weight = ["live = empty[:, None] & (kj < Sk)"], []
            w, dop_w, scale = "dpd", "(dpd * inv_sk)", " * inv_sk"
        else:
            em = Emitter(spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)", prefix="ig")
            lines, dloc, dops = self._masked_scores(em, "s", f"tl.dot(q, kT{self.prec})", grads=True)
            rows = ["live = sel[:, None] & valid",
                    f"p = tl.where(live, {self.exp_p('x', 'm_ref[:, None]')} * inv_l[:, None], 0.0)"]
            weight = ["w = tl.where(p == 0.0, 0.0, p * dpd)"]
            w, dop_w, scale = "w", "w", ""
        inner = [
            "offs_n = start_n + tl.arange(0, BLOCK_N)",
            "kj = offs_n[None, :]",
            f"kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd"
            f"{_mask_kw('(kj < Sk)', self.dmask and self.dmask + '[:, None]')})",
            f"vT = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd"
            f"{_mask_kw('(kj < Sk)', self.dvmask and self.dvmask + '[:, None]')})",
            *lines,
            *([] if uniform else rows),
            f"dpd = tl.dot(do, vT{self.prec}) - delta[:, None]",
            *(rows if uniform else weight),
            f"u = tl.where(live, {w} * {dloc}, 0.0)",
            f"dq += tl.dot(u.to({self.elt}), tl.trans(kT){self.prec})",
        ]
        for n in self.grad_ops:
            inner += [
                f"dptr{n} = DOP{n}b + qi.to(tl.int64) * dst{n}_m + kj * dst{n}_n",
                f"dold{n} = tl.load(dptr{n}, mask=live, other=0.0)",
                f"tl.store(dptr{n}, dold{n} + {dop_w} * {dops[n]}, mask=live)",
            ]
        sel, select = self._row_selection(rule, "lse", "row_ok")
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
            *(["delta = tl.sum(do.to(tl.float32) * vmean[None, :], 1)"] if uniform else self._row_stats_lines()),
            f"dq = tl.zeros([BLOCK_M, {spec.BD}], tl.float32)",
            *([] if uniform else ["lo, _a, _b, hi = _kv_blocks(start_m, Sq, Sk, coff, BLOCK_M, BLOCK_N)"]),
            f"for start_n in {self.rng('0', 'Sk', 'BLOCK_N') if uniform else self.rng('lo', 'hi', 'BLOCK_N')}:",
            *_nest(inner),
            "dq_ptr = DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd",
            f"dq_mask = {_and(f'{sel}[:, None]', dm)}",
            "dq_old = tl.load(dq_ptr, mask=dq_mask, other=0.0).to(tl.float32)",
            f"tl.store(dq_ptr, (dq_old + dq{scale}).to(DQ.dtype.element_ty), mask=dq_mask)",
        ]
        body = [
            "b64 = off_b.to(tl.int64)",
            "h64 = off_h.to(tl.int64)",
            "offs_m = start_m + tl.arange(0, BLOCK_M)",
            "row_ok = offs_m < Sq",
            "lse = tl.load(LSE + b64 * slb + h64 * slh + offs_m * slm, mask=row_ok, other=0.0)",
            select,
            f"if tl.max({sel}.to(tl.int32), 0) != 0:",
            *_nest(work),
        ]
        ops = f"{self.op_kernel_params()}{self.dop_kernel_params()}{_STRIDES}"
        params = (f"Q, K, V, DO, LSE, DQ, {ops}vmean, off_b, off_h, start_m, Sq, Sk, inv_sk, " if uniform else
                  f"Q, K, V, DO, LSE, DELTA, DQ, {ops}off_b, off_h, start_m, Sq, Sk, H, coff, bhs, ")
        head = ["@triton.jit", f"def _{rule}_dq_block({params}BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):"]
        return head + _nest(body) + [""]

    def _dkdv_block(self, rule: str):
        """dK, dV of keys [n0, n0 + BLOCK_N) of kv head off_hk over every row of the rule among its G query
        heads."""
        spec = self.spec
        uniform = rule == "uniform"
        if uniform:
            em = Emitter(spec, "sT", "qi", "kj", "(qi < Sq)", "(kj < Sk)", prefix="ue")
            lines, dloc, _ = self._uniform_derivatives(em, "sT", f"tl.dot(k, qT{self.prec})")
            first = [
                "dof = do.to(tl.float32)",
                "delta = tl.sum(dof * vmean[None, :], 1)",
                "dosum += tl.sum(tl.where(empty[:, None], dof, 0.0), 0)",
                *lines,
            ]
            then = [f"uT = tl.where(empty[None, :] & (kj < Sk), dpd * {dloc}, 0.0)"]
        else:
            em = Emitter(spec, "sT", "qi", "kj", "(qi < Sq)", "(kj < Sk)", prefix="ig")
            lines, dloc, _ = self._masked_scores(em, "sT", f"tl.dot(k, qT{self.prec})", grads=True)
            first = [
                "srow = srow0 + offs_m",
                "m_r = tl.load(DELTA + bhs + srow, mask=sel, other=0.0)",
                "l_r = tl.load(DELTA + 2 * bhs + srow, mask=sel, other=1.0)",
                "delta = tl.load(DELTA + srow, mask=sel, other=0.0)",
                *lines,
                "liveT = sel[None, :] & valid",
                f"pT = tl.where(liveT, {self.exp_p('x', 'm_r[None, :]')} / l_r[None, :], 0.0)",
                f"dv += tl.dot(pT.to({self.elt}), do{self.prec})",
            ]
            then = ["wT = tl.where(pT == 0.0, 0.0, pT * dpd)", f"uT = tl.where(liveT, wT * {dloc}, 0.0)"]
        blk = [
            f"qT = tl.load(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd"
            f"{_mask_kw('(qi < Sq)', self.dmask and self.dmask + '[:, None]')})",
            f"do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod"
            f"{_mask_kw('(offs_m[:, None] < Sq)', self.dvmask and self.dvmask + '[None, :]')})",
            *first,
            f"dpd = tl.dot(v, tl.trans(do){self.prec}) - delta[None, :]",
            *then,
            f"dk += tl.dot(uT.to({self.elt}), tl.trans(qT){self.prec})",
        ]
        sel, select = self._row_selection(rule, "lse", "(offs_m < Sq)")
        per_block = [
            "offs_m = start_m + tl.arange(0, BLOCK_M)",
            "qi = offs_m[None, :]",
            "lse = tl.load(lse_base + offs_m * slm, mask=offs_m < Sq, other=0.0)",
            select,
            f"if tl.max({sel}.to(tl.int32), 0) != 0:",
            *_nest(blk),
        ]
        per_head = [
            f"h64 = (off_hk * {spec.G} + g).to(tl.int64)",
            "q_base = Q + b64 * sqb + h64 * sqh",
            "do_base = DO + b64 * sdob + h64 * sdoh",
            "lse_base = LSE + b64 * slb + h64 * slh",
            *self.op_bases(),
        ]
        if uniform:
            per_head.append(f"for start_m in {self.rng('0', 'Sq', 'BLOCK_M')}:")
        else:
            per_head += ["srow0 = (b64 * H + h64) * Sq",
                         "lo, _a, _b, hi = _q_blocks(n0, Sq, Sk, coff, BLOCK_M, BLOCK_N)",
                         f"for start_m in {self.rng('lo', 'hi', 'BLOCK_M')}:"]
        per_head += _nest(per_block)
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
            *(self._vmean_lines() if uniform else []),
            f"dk = tl.zeros([BLOCK_N, {spec.BD}], tl.float32)",
            f"dosum = tl.zeros([{spec.BDV}], tl.float32)" if uniform else
            f"dv = tl.zeros([BLOCK_N, {spec.BDV}], tl.float32)",
            f"for g in range({spec.G}):",
            *_nest(per_head),
            "dk_ptr = DK + b64 * sdkb + hk64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd",
            f"dk_mask = {_and('(kj < Sk)', dm)}",
            "dk_old = tl.load(dk_ptr, mask=dk_mask, other=0.0).to(tl.float32)",
            f"tl.store(dk_ptr, (dk_old + dk{' * inv_sk' if uniform else ''}).to(DK.dtype.element_ty), mask=dk_mask)",
            "dv_ptr = DV + b64 * sdvb + hk64 * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd",
            f"dv_mask = {_and('(kj < Sk)', dvm)}",
            "dv_old = tl.load(dv_ptr, mask=dv_mask, other=0.0).to(tl.float32)",
            "tl.store(dv_ptr, (dv_old + (dosum * inv_sk)[None, :]).to(DV.dtype.element_ty), mask=dv_mask)"
            if uniform else "tl.store(dv_ptr, (dv_old + dv).to(DV.dtype.element_ty), mask=dv_mask)",
        ]
        params = (f"Q, K, V, DO, LSE, DK, DV, {self.op_kernel_params()}{_STRIDES}off_b, off_hk, n0, Sq, Sk, inv_sk, "
                  if uniform else
                  f"Q, K, V, DO, LSE, DELTA, DK, DV, {self.op_kernel_params()}{_STRIDES}off_b, off_hk, n0, Sq, Sk, "
                  "H, coff, bhs, ")
        head = ["@triton.jit", f"def _{rule}_dkdv_block({params}BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):"]
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
        return self._dq_block("uniform") + self._dkdv_block("uniform") + head + _nest(body) + [""]

    def imprecise_kernel(self):
        """attn_bwd_imprecise: PART 1 strides over the listed query blocks, PART 2 over the listed (group, key
        block) items (module docstring). LSE: the forward's lse (rows are selected on it); DELTA: delta, m, l."""
        spec = self.spec
        ops = self.op_kernel_params()
        dq_call = (f"_imprecise_dq_block(Q, K, V, DO, LSE, DELTA, DQ, {ops}{self.dop_kernel_params()}{_STRIDES}"
                   "off_b, off_h, start_m, Sq, Sk, H, coff, bhs, BLOCK_M, BLOCK_N)")
        dkdv_call = (f"_imprecise_dkdv_block(Q, K, V, DO, LSE, DELTA, DK, DV, {ops}{_STRIDES}grp // (H // {spec.G}), "
                     f"grp % (H // {spec.G}), (w % NUM_N) * BLOCK_N, Sq, Sk, H, coff, bhs, BLOCK_M, BLOCK_N)")
        nprog = "_ix(tl.num_programs(0))" if spec.interpret else "tl.num_programs(0)"
        body = [
            f"IW = WORK + {self._imprecise_list('NG', 'NUM_PRE')}",
            f"bhs = NG.to(tl.int64) * {spec.G} * Sq",
            "if PART == 1:",
            f"    for w in {self.rng('tl.program_id(0)', 'tl.load(IW + NG)', nprog)}:",
            "        item = tl.load(IW + 2 * NG + 2 + w)",
            "        bh = item // NUM_PRE",
            "        off_b = bh // H",
            "        off_h = bh % H",
            "        m0 = (item % NUM_PRE) * PRE_M",
            f"        for start_m in {self.rng('m0', 'm0 + PRE_M', 'BLOCK_M')}:",
            "            " + dq_call,
            "else:",
            f"    for w in {self.rng('tl.program_id(0)', 'tl.load(IW + NG + 1) * NUM_N', nprog)}:",
            "        grp = tl.load(IW + NG + 2 + w // NUM_N)",
            "        " + dkdv_call,
        ]
        head = [
            '@triton.jit(do_not_specialize=["Sq", "Sk", "NG", "NUM_PRE", "NUM_N", "coff", "slb", "slh"])',
            f"def attn_bwd_imprecise(Q, K, V, DO, LSE, DELTA, WORK, DQ, DK, DV, {ops}{self.dop_kernel_params()}"
            f"{_STRIDES}Sq, Sk, H, NG, NUM_PRE, NUM_N, coff, PART: tl.constexpr, PRE_M: tl.constexpr, "
            "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):",
        ]
        return self._dq_block("imprecise") + self._dkdv_block("imprecise") + head + _nest(body) + [""]
