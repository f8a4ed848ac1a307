"""Text of the split-KV decode kernels (variant "decode" of a KernelSpec); see templates.py.

    attn_decode          grid (split, kv head, batch). A program takes one split of the key axis for one
                         (batch, kv head) and every query row of the group: its BLOCK_M rows are the G query
                         heads x Sq queries (row r -> head g = r // Sq, query i = r % Sq), so each K/V tile it
                         loads serves the whole group. Online softmax over the split's key blocks with the
                         forward's tile functions (the same score program, structural mask and bounds runs).
                         FINAL (one split): writes the normalised out and lse directly. Otherwise it writes the
                         split's partial (out normalised by its own sum, lse), and
    attn_decode_combine  grid (query, head, batch) merges the splits: lse = logsumexp_s lse_s,
                         out = sum_s exp(lse_s - lse) * out_s. A split that saw no visible key has lse_s = -inf
                         and weight 0; a row with none at all is empty (NaN or 0 by the program's rule).
Rows past G·Sq (BLOCK_M is a power of two) repeat the group's last head, so every load stays in bounds
without a row mask; they are never stored.
"""

from __future__ import annotations

from .templates_bwd import _and, _ind, _mask_kw


class DecodeKernels:
    """Decode kernel text; mixed into templates._Gen (uses fwd_tile, op_bases, exp_p, helpers)."""

    def decode_ranges(self):
        """Key runs of one split [s0, s0 + chunk): [lo, a) masked, [a, b) needing no mask, [b, hi) masked.
        Every boundary is a multiple of BLOCK_N (chunk is), so no tile crosses into the next split; the rows
        are all Sq queries, so the unmasked run must be visible to query 0 and to query Sq - 1."""
        W = self.window
        lines = [
            "@triton.jit",
            "def _decode_blocks(s0, chunk, Sq, Sk, coff, BLOCK_N: tl.constexpr):",
            "    lo = s0",
            "    hi = tl.minimum(s0 + chunk, Sk)",
            "    a = lo",
            "    b = tl.minimum(s0 + chunk, (Sk // BLOCK_N) * BLOCK_N)",
        ]
        if self.causal:
            lines += ["    hi = tl.minimum(hi, tl.maximum(Sq + coff, 0))",
                      "    b = tl.minimum(b, (tl.maximum(coff + 1, 0) // BLOCK_N) * BLOCK_N)"]
            if W is not None:
                lines += [f"    lo = tl.maximum(lo, (tl.maximum(coff - {W}, 0) // BLOCK_N) * BLOCK_N)",
                          f"    a = ((tl.maximum(Sq - 1 + coff - {W}, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N"]
        lines += ["    hi = tl.maximum(hi, lo)",
                  "    a = tl.minimum(tl.maximum(a, lo), hi)",
                  "    b = tl.minimum(tl.maximum(b, a), hi)",
                  "    return lo, a, b, hi", ""]
        return lines

    def decode_kernel(self):
        spec, G = self.spec, self.spec.G
        call = ("acc, l_i, m_i = _fwd_tile_{tag}(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start_n,"
                f" qrow, Sq, Sk, coff, {self.op_tile_params()}BLOCK_M, BLOCK_N)")
        fill = "float('nan')" if self.nan_mode else "0.0"
        if self.scale is not None:
            lse = "(m_i + tl.math.log2(l_safe)) * 0.6931471805599453"
        else:
            lse = "m_i + tl.log(l_safe)"
        dvm = self.dvmask and self.dvmask + "[None, :]"
        body = [
            "split = tl.program_id(0)",
            "off_hk = tl.program_id(1)",
            "off_b = tl.program_id(2)",
            "b64 = off_b.to(tl.int64)",
            "hk64 = off_hk.to(tl.int64)",
            "r = tl.arange(0, BLOCK_M)",
            f"row_ok = r < {G} * Sq",
            f"hrow64 = (off_hk * {G} + tl.minimum(r // Sq, {G - 1})).to(tl.int64)",
            "qrow = r % Sq",
            "hcol = hrow64[:, None]",
            "i64 = qrow[:, None].to(tl.int64)",
            f"offs_d = tl.arange(0, {spec.BD})",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            f"q = tl.load(Q + b64 * sqb + hcol * sqh + i64 * sqm + offs_d[None, :] * sqd"
            f"{_mask_kw(self.dmask and self.dmask + '[None, :]')})",
            "k_base = K + b64 * skb + hk64 * skh",
            "v_base = V + b64 * svb + hk64 * svh",
        ] + self.op_bases(b="b64", h="hcol") + [
            "m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)",
            "l_i = tl.zeros([BLOCK_M], tl.float32)",
            f"acc = tl.zeros([BLOCK_M, {spec.BDV}], tl.float32)",
            "lo, a, b, hi = _decode_blocks(split * chunk, chunk, Sq, Sk, coff, BLOCK_N)",
            *self.block_runs("start_n", "BLOCK_N", call),
            "empty = m_i == float('-inf')",
            "l_safe = tl.where(empty, 1.0, l_i)",
            f"lse = tl.where(empty, float('-inf'), {lse})",
            "if FINAL:",
            f"    out = tl.where(empty[:, None], {fill}, acc / l_safe[:, None])",
            "    tl.store(O + b64 * sob + hcol * soh + i64 * som + offs_dv[None, :] * sod, "
            f"out.to(O.dtype.element_ty), mask={_and('row_ok[:, None]', dvm)})",
            "    tl.store(LSE + b64 * slb + hrow64 * slh + qrow.to(tl.int64) * slm, lse, mask=row_ok)",
            "else:",
            "    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])",
            "    s64 = split.to(tl.int64)",
            "    tl.store(OP_ + b64 * spb + hcol * sph + i64 * spm + s64 * sps + offs_dv[None, :] * spd, out, "
            f"mask={_and('row_ok[:, None]', dvm)})",
            "    tl.store(LP_ + b64 * slpb + hrow64 * slph + qrow.to(tl.int64) * slpm + s64 * slps, lse, "
            "mask=row_ok)",
        ]
        head = [
            # lengths and the split count change as a cache grows, and with the split count the partial lse
            # buffer's outer strides (the partial outputs' stay multiples of Dv): none is specialised on, so a
            # growing cache compiles nothing new
            '@triton.jit(do_not_specialize=["Sq", "Sk", "coff", "chunk", "slb", "slh", "slpb", "slph", "slpm"])',
            f"def attn_decode(Q, K, V, O, LSE, OP_, LP_, {self.op_kernel_params()}"
            "sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm, "
            "spb, sph, spm, sps, spd, slpb, slph, slpm, slps, Sq, Sk, coff, chunk, "
            "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FINAL: tl.constexpr):",
        ]
        return head + [_ind(body)] + [""]

    def decode_combine(self):
        spec = self.spec
        fill = "float('nan')" if self.nan_mode else "0.0"
        dvm = self.dvmask and self.dvmask + "[None, :]"
        body = [
            "i64 = tl.program_id(0).to(tl.int64)",
            "h64 = tl.program_id(1).to(tl.int64)",
            "b64 = tl.program_id(2).to(tl.int64)",
            "offs_s = tl.arange(0, BLOCK_S)",
            f"offs_dv = tl.arange(0, {spec.BDV})",
            "s_ok = offs_s < n_split",
            "lse_s = tl.load(LP_ + b64 * slpb + h64 * slph + i64 * slpm + offs_s * slps, mask=s_ok, "
            "other=float('-inf'))",
            "m = tl.max(lse_s, 0)",
            "empty = m == float('-inf')",
            "m_use = tl.where(empty, 0.0, m)",
            "w = tl.exp(lse_s - m_use)",
            "total = tl.sum(w, 0)",
            "t_safe = tl.where(empty, 1.0, total)",
            "o_s = tl.load(OP_ + b64 * spb + h64 * sph + i64 * spm + offs_s[:, None] * sps + offs_dv[None, :] * spd"
            f", mask={_and('s_ok[:, None]', dvm)}, other=0.0)",
            "out = tl.sum(o_s * w[:, None], 0) / t_safe",
            f"out = tl.where(empty, {fill}, out)",
            "lse = tl.where(empty, float('-inf'), m_use + tl.log(t_safe))",
            "tl.store(O + b64 * sob + h64 * soh + i64 * som + offs_dv * sod, out.to(O.dtype.element_ty)"
            + (f", mask={self.dvmask})" if self.dvmask else ")"),
            "tl.store(LSE + b64 * slb + h64 * slh + i64 * slm, lse)",
        ]
        head = [
            '@triton.jit(do_not_specialize=["n_split", "slb", "slh", "slpb", "slph", "slpm"])',
            "def attn_decode_combine(OP_, LP_, O, LSE, spb, sph, spm, sps, spd, slpb, slph, slpm, slps, "
            "sob, soh, som, sod, slb, slh, slm, n_split, BLOCK_S: tl.constexpr):",
        ]
        return head + [_ind(body)] + [""]

    def decode_module_body(self):
        return (self.decode_ranges() + self.fwd_tile(True) + self.fwd_tile(False) + self.decode_kernel()
                + self.decode_combine())
