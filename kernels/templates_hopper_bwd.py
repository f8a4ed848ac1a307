"""Text of the generated Hopper (sm_90a) warp-specialized backward kernel, in Gluon, for one KernelSpec.

FlashAttention-3's backward schedule. One CTA owns BLOCK_N = 128 keys of one (batch, K/V head) and walks the
query tiles that see them (BLOCK_M = 64 or 128 rows, every query head of the GQA group in turn), with three
partitions (`gl.warp_specialize`), four with the dQ writer:

    producer   1 warp, 24 registers. TMA-loads the CTA's K and V tiles (barrier kv_bar), then for each query
               tile waits empty[stage] (both consumers are done with that Q / dO slot) and TMA-loads Q and dO into
               the slot (completes full[stage]); with STATS_SMEM it also loads the tile's lse and delta rows into
               the slot's shared rows (a second arrival on full[stage]).
    consumer w (w = 0: the default partition; w = 1: a worker), one warpgroup each, 240 registers, owns keys
               [n0 + 64 w, n0 + 64 w + 64) and their dK, dV accumulators (fp32, in registers for the whole walk).
    dQ writer  (DQ_WRITER) 1 warp, 24 registers: per tile waits dq_full[tile % 2] (both consumers' dQ blocks
               are in that shared buffer), issues their TMA bulk reductions into the fp32 dQ buffer, waits until
               they have read shared memory and frees the buffer (dq_empty), so a consumer waits only when both
               buffers are still being read.

Per query tile a consumer issues Sᵀ = K_w Qᵀ and dPᵀ = V_w dOᵀ back to back (async wgmma, K_w / V_w and
Q / dO all from shared memory), recomputes Pᵀ from the score chain and the forward's log-sum-exp while dPᵀ
still runs, forms dSᵀ = Pᵀ ∘ (dPᵀ − δ) · ∂x/∂s, then issues dV += Pᵀ dO and dK += dSᵀ Q with Pᵀ / dSᵀ as
register operands. dQ needs dS over all 128 keys: each consumer stores its dSᵀ half into a shared buffer
(two buffers, alternating by tile), arrives on ds_bar[tile % 2] (count 2) and waits for the other half; then
it computes its dQ block = dS K (dS transposed from shared memory) — all rows x half the head dim, or with a
128-row step half the rows x the whole head dim (the dq descriptor's block shape says which) — and adds it
to an fp32 dQ buffer (rows padded to whole query tiles): one TMA bulk reduction from shared memory issued by
the consumer (DQ_ADD=3) or by the dQ writer (DQ_WRITER), or per-thread vector atomics (DQ_ADD=1). By default
the dQ product follows dK / dV (whose completion releases the Q / dO slot: empty, count 2); DQ_EARLY issues
it between dV and dK, as FlashAttention-3 does, so the dQ hand-off runs while dK computes; DQ_LAG queues it
behind the next tile's S / dP. Reuse of a dS buffer two tiles later is safe: a consumer arrives on ds_bar
only after its previous dQ product completed. At the end both consumers meet on fin (count 2) — the other
may still read this one's K rows for dQ — then write dK / dV over their own K / V rows in shared memory, meet
again, and the first consumer TMA-stores both tiles.

dQ is therefore not deterministic (atomic order); dispatch sends deterministic runs to the portable backward.
The score chain (scale, biases, masks, soft-capping) and its derivative are the ScoreProgram's, emitted by
codegen.Emitter in Gluon spelling, on the transposed tile (rows = keys, columns = queries).
"""

from __future__ import annotations

from .codegen import LOG2E, Emitter, KernelSpec
from .program import derivative
from .templates_bwd import _and, _ind
from .templates_hopper import _HEAD as _FWD_HEAD
from .templates_hopper import operand_text

# the two consumers and the producer: the same in both partition lists of attn_bwd_ws (with and without the
# dQ writer), spelled once
_PARTITIONS = '''            (_bwd_consumer, (q2, k2, v2, do2, ds_smem, k_smem, v_smem, kv_bar, full, empty, ds_bar, ds_free, fin,
                             dk_desc, dv_desc, LSE, DELTA, lse_smem, delta_smem, DQ, dq_desc, dq_smem, dq_full,
                             dq_empty, FLAG, slb, slh, slm, off_b, off_hk, n0, m_lo, n_m, Sq, Sk, coff, H,
                             __OPS_KARGS__0, BLOCK_M, BLOCK_N, HEAD_D, STAGES, DQ_LAG, DQ_ADD, DQ_WRITER, DQ_EARLY,
                             STATS_SMEM, DQ_ALT)),
            (_bwd_consumer, (q2, k2, v2, do2, ds_smem, k_smem, v_smem, kv_bar, full, empty, ds_bar, ds_free, fin,
                             dk_desc, dv_desc, LSE, DELTA, lse_smem, delta_smem, DQ, dq_desc, dq_smem, dq_full,
                             dq_empty, FLAG, slb, slh, slm, off_b, off_hk, n0, m_lo, n_m, Sq, Sk, coff, H,
                             __OPS_KARGS__1, BLOCK_M, BLOCK_N, HEAD_D, STAGES, DQ_LAG, DQ_ADD, DQ_WRITER, DQ_EARLY,
                             STATS_SMEM, DQ_ALT)),
            (_bwd_producer, (q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, kv_bar, full, empty,
                             LSE, DELTA, lse_smem, delta_smem, slb, slh, slm, Sq, H, off_b, off_hk, n0, m_lo, n_m,
                             BLOCK_M, BLOCK_N, STAGES, STATS_SMEM, DQ_ALT)),
'''

_KERNEL = '''
@gluon.jit
def _tile_of(it, n_m, m_lo, off_hk, BLOCK_M: gl.constexpr):
    """(first query row, query head) of the it-th tile a CTA walks: the query tiles of each head of the group."""
    g = it // n_m
    return m_lo + (it - g * n_m) * BLOCK_M, off_hk * __G__ + g


@gluon.jit
def _n_steps(n_it, DQ_ALT: gl.constexpr):
    """Tiles a partition walks: n_it, or with DQ_ALT an even count (the consumers take dQ tiles in turn, in
    pairs); the padding tile repeats the last one with lse = +inf, so p = dS = 0 and it adds zeros."""
    if DQ_ALT:
        return (n_it + 1) // 2 * 2
    else:
        return n_it


@gluon.jit
def _bwd_producer(q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, kv_bar, full, empty,
                  LSE, DELTA, lse_smem, delta_smem, slb, slh, slm, Sq, H, off_b, off_hk, n0, m_lo, n_m,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, STATS_SMEM: gl.constexpr,
                  DQ_ALT: gl.constexpr):
    st_l: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [off_b, off_hk, n0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [off_b, off_hk, n0, 0], kv_bar, v_smem)
    n_it = __G__ * n_m
    for it in range(_n_steps(n_it, DQ_ALT)):
        start_m, off_h = _tile_of(gl.minimum(it, n_it - 1), n_m, m_lo, off_hk, BLOCK_M)
        st = it % STAGES
        ph = (it // STAGES) & 1
        # a fresh barrier passes a wait on parity 1, so the first STAGES loads do not wait
        mbarrier.wait(empty.index(st), ph ^ 1)
        mbarrier.expect(full.index(st), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m, 0], full.index(st), q_smem.index(st))
        tma.async_copy_global_to_shared(do_desc, [off_b, off_h, start_m, 0], full.index(st), do_smem.index(st))
        if STATS_SMEM:  # the tile's lse and delta rows, the second arrival on full[stage]
            offs_m = start_m + gl.arange(0, BLOCK_M, st_l)
            row_ok = offs_m < Sq
            lse = gl.load(LSE + off_b.to(gl.int64) * slb + off_h.to(gl.int64) * slh + offs_m * slm, mask=row_ok,
                          other=float("inf"))
            lse = gl.where(lse == float("-inf"), float("inf"), lse)   # empty rows (and rows past Sq): p = 0
            lse = gl.where(it < n_it, lse, float("inf"))     # DQ_ALT's padding tile: p = 0, it adds nothing
            delta = gl.load(DELTA + (off_b.to(gl.int64) * H + off_h) * Sq + offs_m, mask=row_ok, other=0.0)
            # in the units the consumer uses them (a scale-only program: log2 units, delta times the scale)
            lse_smem.index(st).store(__LSE_ROW__)
            delta_smem.index(st).store(__DELTA_ROW__)
            mbarrier.arrive(full.index(st))


@gluon.jit
def _ds_rows(buf, DQ_R0: gl.constexpr, DQ_M: gl.constexpr, BLOCK_M: gl.constexpr):
    """dS (queries x keys, from the transposed shared tile) for the dQ rows [DQ_R0, DQ_R0 + DQ_M) of a tile."""
    if DQ_M == BLOCK_M:
        return buf.permute((1, 0))
    else:
        return buf.slice(DQ_R0, DQ_M, dim=1).permute((1, 0))


@gluon.jit
def _dq_add(dq, j, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full, dq_empty, dq_offs, n_m, m_lo, off_hk, off_b, H,
            sq_pad, WG: gl.constexpr, DQ_R0: gl.constexpr, DQ_C0: gl.constexpr, BLOCK_M: gl.constexpr,
            HEAD_D: gl.constexpr, DQ_ADD: gl.constexpr, DQ_WRITER: gl.constexpr, DQ_ALT: gl.constexpr = False):
    """Adds this consumer's dQ product of tile j (its block: rows from DQ_R0, columns from DQ_C0) into the fp32
    dQ buffer."""
    start_m, off_h = _tile_of(gl.minimum(j, __G__ * n_m - 1), n_m, m_lo, off_hk, BLOCK_M)   # (DQ_ALT padding)
    # the fp32 dQ buffer has whole tiles of rows (Sq rounded up to BLOCK_M): no predicate on the atomics
    dq_base = DQ + ((off_b.to(gl.int64) * H + off_h) * sq_pad + start_m) * HEAD_D
    if DQ_ADD == 1:     # from the wgmma layout: two consecutive fp32 per atomic
        gl.atomic_add(dq_base + dq_offs, dq, sem="relaxed")
    elif DQ_ADD == 3:
        if DQ_WRITER:   # hand the tile to the dQ-writer warp through buffer j % 2; wait only if it still reads it
            b = j % 2
            mbarrier.wait(dq_empty.index(b), ((j // 2) & 1) ^ 1)
            if DQ_ALT:  # one whole tile per buffer
                dq_all.index(b).store(dq)
            else:
                dq_all.index(2 * b + WG).store(dq)
            fence_async_shared()
            mbarrier.arrive(dq_full.index(b))
        else:           # one TMA bulk reduction per tile from shared memory, issued here
            tma.store_wait(0)   # the previous tile's reduction has read the buffer
            dq_buf.store(dq)
            fence_async_shared()
            async_reduce_add_shared_to_global(dq_desc, [off_b, off_h, start_m + DQ_R0, DQ_C0], dq_buf4)
    # DQ_ADD == 0: no dQ (a diagnostic, bench/bwd_ws.py only; the dQ product is then dead and the compiler drops
    # its wgmma too: it measures 4 of the 5 GEMMs)


@gluon.jit
def _dq_step(j, ds_smem, ds_bar, k_half, zero_dq, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full, dq_empty, dq_offs,
             n_m, m_lo, off_hk, off_b, H, sq_pad, WG: gl.constexpr, DQ_R0: gl.constexpr, DQ_C0: gl.constexpr,
             DQ_M: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr, DQ_ADD: gl.constexpr,
             DQ_WRITER: gl.constexpr):
    """dQ[tile j, this consumer's columns] += dS K over all BLOCK_N keys, once both dS halves of tile j are in
    shared memory."""
    buf = ds_smem.index(j % 2)
    mbarrier.wait(ds_bar.index(j % 2), (j // 2) & 1)
    dq = warpgroup_mma(_ds_rows(buf, DQ_R0, DQ_M, BLOCK_M), k_half, zero_dq, use_acc=False)
    _dq_add(dq, j, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full, dq_empty, dq_offs, n_m, m_lo, off_hk, off_b, H,
            sq_pad, WG, DQ_R0, DQ_C0, BLOCK_M, HEAD_D, DQ_ADD, DQ_WRITER)


@gluon.jit
def _bwd_dq_writer(dq_desc, dq_smem, dq_full, dq_empty, off_b, off_hk, m_lo, n_m, BLOCK_M: gl.constexpr,
                   HEAD_D: gl.constexpr, DQ_ALT: gl.constexpr):
    """The dQ-writer warp: for each tile, once both consumers' halves are in buffer j % 2, one TMA bulk
    reduction per half into the fp32 dQ buffer; the buffer is released as soon as the reductions have read it."""
    DQ_M: gl.constexpr = dq_desc.block_type.shape[2]
    DQ_N: gl.constexpr = dq_desc.block_type.shape[3]
    n_it = __G__ * n_m
    for j in range(_n_steps(n_it, DQ_ALT)):
        start_m, off_h = _tile_of(gl.minimum(j, n_it - 1), n_m, m_lo, off_hk, BLOCK_M)
        b = j % 2
        mbarrier.wait(dq_full.index(b), (j // 2) & 1)
        if DQ_ALT:      # one consumer's whole tile
            async_reduce_add_shared_to_global(dq_desc, [off_b, off_h, start_m, 0], dq_smem.index(b))
        else:
            for w in gl.static_range(2):
                # consumer w's block: half the rows (all columns) or all rows (half the columns)
                r0 = w * DQ_M * (BLOCK_M // DQ_M - 1)
                c0 = w * DQ_N * (HEAD_D // DQ_N - 1)
                async_reduce_add_shared_to_global(dq_desc, [off_b, off_h, start_m + r0, c0],
                                                  dq_smem.index(2 * b + w))
        tma.store_wait(0)   # .read: shared memory read, the adds may still be in flight in L2
        mbarrier.arrive(dq_empty.index(b))


@gluon.jit
def _bwd_consumer(q2, k2, v2, do2, ds_smem, k_smem, v_smem, kv_bar, full, empty, ds_bar, ds_free, fin,
                  dk_desc, dv_desc, LSE, DELTA, lse_smem, delta_smem, DQ, dq_desc, dq_smem, dq_full, dq_empty, FLAG,
                  slb, slh, slm, off_b, off_hk, n0, m_lo, n_m, Sq, Sk, coff, H, __OPS_PARAMS__WG: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                  DQ_LAG: gl.constexpr, DQ_ADD: gl.constexpr, DQ_WRITER: gl.constexpr, DQ_EARLY: gl.constexpr,
                  STATS_SMEM: gl.constexpr, DQ_ALT: gl.constexpr):
    dtype: gl.constexpr = q2.dtype
    KW: gl.constexpr = BLOCK_N // 2          # keys per consumer (wgmma M)
    DQ_M: gl.constexpr = dq_desc.block_type.shape[2]     # dQ rows per consumer (BLOCK_M or half of it)
    HD2: gl.constexpr = dq_desc.block_type.shape[3]      # dQ columns per consumer (half the head dim or all)
    DQ_R0: gl.constexpr = WG * DQ_M * (BLOCK_M // DQ_M - 1)     # this consumer's dQ block origin
    DQ_C0: gl.constexpr = WG * HD2 * (HEAD_D // HD2 - 1)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_D, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HD2, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    dqr_l: gl.constexpr = gl.SliceLayout(1, dq_layout)
    dqc_l: gl.constexpr = gl.SliceLayout(0, dq_layout)
    k_w = k2.slice(WG * KW, KW, dim=0)
    v_w = v2.slice(WG * KW, KW, dim=0)
    k_half = k2.slice(DQ_C0, HD2, dim=1)
    kj = gl.expand_dims(n0 + WG * KW + gl.arange(0, KW, row_l), 1)
    zero_s = gl.zeros([KW, BLOCK_M], gl.float32, s_layout)
    zero_dq = gl.zeros([DQ_M, HD2], gl.float32, dq_layout)
    dk = gl.zeros([KW, HEAD_D], gl.float32, kv_layout)
    dv = gl.zeros([KW, HEAD_D], gl.float32, kv_layout)
    dq_offs = (gl.expand_dims(DQ_R0 + gl.arange(0, DQ_M, dqr_l), 1) * HEAD_D
               + gl.expand_dims(DQ_C0 + gl.arange(0, HD2, dqc_l), 0))
    sq_pad = gl.cdiv(Sq, BLOCK_M) * BLOCK_M
    dq_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([DQ_M, HD2], gl.float32)
    dq_buf4 = dq_smem.index(WG)
    dq_buf = dq_buf4._reinterpret(gl.float32, [DQ_M, HD2], dq_l)
    # the writer's buffers: [2 tiles x 2 halves] (index 2 * (tile % 2) + consumer)
    dq_all = dq_smem._reinterpret(gl.float32, [dq_smem.shape[0], DQ_M, HD2], dq_l)
    mbarrier.wait(kv_bar, 0)
    n_it = __G__ * n_m
    STEP: gl.constexpr = 2 if DQ_ALT else 1
    for it0 in range(0, _n_steps(n_it, DQ_ALT), STEP):
        # DQ_ALT: consumer `half` reads dS for the whole dQ tile, a compile-time fact (no branch per tile)
        for half in gl.static_range(STEP):
            it = it0 + half
            start_m, off_h = _tile_of(gl.minimum(it, n_it - 1), n_m, m_lo, off_hk, BLOCK_M)
__OPS_BASES__
            st = it % STAGES
            mbarrier.wait(full.index(st), (it // STAGES) & 1)
            q_t = q2.index(st)
            do_t = do2.index(st)
            s_tok = warpgroup_mma(k_w, q_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(v_w, do_t.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            if DQ_LAG:      # the previous tile's dQ, queued behind S / dP on the tensor cores
                if it > 0:
                    _dq_step(it - 1, ds_smem, ds_bar, k_half, zero_dq, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full,
                             dq_empty, dq_offs, n_m, m_lo, off_hk, off_b, H, sq_pad, WG, DQ_R0, DQ_C0, DQ_M, BLOCK_M,
                             HEAD_D, DQ_ADD, DQ_WRITER)
            offs_m = start_m + gl.arange(0, BLOCK_M, col_l)
            if not STATS_SMEM:
                row_ok = offs_m < Sq
                lse = gl.load(LSE + off_b.to(gl.int64) * slb + off_h.to(gl.int64) * slh + offs_m * slm, mask=row_ok,
                              other=float("inf"))
                lse = gl.where(lse == float("-inf"), float("inf"), lse)   # empty rows (and rows past Sq): p = 0
                delta = gl.load(DELTA + (off_b.to(gl.int64) * H + off_h) * Sq + offs_m, mask=row_ok, other=0.0)
            qi = gl.expand_dims(offs_m, 0)
            masked = _tile_masked(start_m, n0, Sq, Sk, coff, BLOCK_M, BLOCK_N)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            if STATS_SMEM:      # (the score functions whose x suits the pre-scaled lse)
                if masked:
                    x, dloc = _score_masked_st(s, qi, kj, Sq, Sk, __OPS_ARGS__)
                    x = gl.where(__VISIBLE__, x, float("-inf"))
                else:
                    x, dloc = _score_full_st(s, qi, kj, Sq, Sk, __OPS_ARGS__)
            else:
                if masked:
                    x, dloc = _score_masked(s, qi, kj, Sq, Sk, __OPS_ARGS__)
                    x = gl.where(__VISIBLE__, x, float("-inf"))
                else:
                    x, dloc = _score_full(s, qi, kj, Sq, Sk, __OPS_ARGS__)
            if STATS_SMEM:  # read where used: 16 + 16 registers live for a few instructions, not across the S wait
                lse = lse_smem.index(st).load(col_l)
                p = __EXP_P_ST__
                dp = warpgroup_mma_wait(0, deps=(dp_tok,))
                delta = delta_smem.index(st).load(col_l)
                ds = __DS_ST__
            else:
                p = __EXP_P__
                dp = warpgroup_mma_wait(0, deps=(dp_tok,))
                ds = p * (dp - gl.expand_dims(delta, 0))
                ds = gl.where(p == 0.0, 0.0, ds) * dloc
            p_op = gl.convert_layout(p.to(dtype), a_layout)
            dv_tok = warpgroup_mma(p_op, do_t, dv, is_async=True)
            ds_lo = ds.to(dtype)
            buf = ds_smem.index(it % 2)
            if DQ_ALT:
                # the whole dQ tile by one consumer, alternating (tile % 2): the other only hands over its dS half
                # (once the reader's previous product from this buffer is done) and goes on, so the two drift apart
                if half != WG:
                    mbarrier.wait(ds_free.index(it % 2), ((it // 2) & 1) ^ 1)
                buf.slice(WG * KW, KW, dim=0).store(ds_lo)
                fence_async_shared()
                mbarrier.arrive(ds_bar.index(it % 2))
                ds_op = gl.convert_layout(ds_lo, a_layout)
                if half == WG:
                    mbarrier.wait(ds_bar.index(it % 2), (it // 2) & 1)
                    dq_tok = warpgroup_mma(buf.permute((1, 0)), k2, zero_dq, use_acc=False, is_async=True)
                    dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
                    dv, dq, p_op = warpgroup_mma_wait(1, deps=(dv_tok, dq_tok, p_op))
                    mbarrier.arrive(ds_free.index(it % 2))
                    _dq_add(dq, it, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full, dq_empty, dq_offs, n_m, m_lo,
                            off_hk, off_b, H, sq_pad, WG, DQ_R0, DQ_C0, BLOCK_M, HEAD_D, DQ_ADD, DQ_WRITER, DQ_ALT)
                    dk, ds_op = warpgroup_mma_wait(0, deps=(dk_tok, ds_op))
                else:
                    dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
                    dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
                mbarrier.arrive(empty.index(st))
            elif DQ_EARLY:
                # FlashAttention-3's order: dQ = dS K goes to the tensor cores between dV and dK, so its hand-off
                # (registers -> shared memory) runs while dK still computes
                buf.slice(WG * KW, KW, dim=0).store(ds_lo)
                fence_async_shared()
                mbarrier.arrive(ds_bar.index(it % 2))
                ds_op = gl.convert_layout(ds_lo, a_layout)
                mbarrier.wait(ds_bar.index(it % 2), (it // 2) & 1)
                dq_tok = warpgroup_mma(_ds_rows(buf, DQ_R0, DQ_M, BLOCK_M), k_half, zero_dq, use_acc=False,
                                       is_async=True)
                dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
                dv, dq, p_op = warpgroup_mma_wait(1, deps=(dv_tok, dq_tok, p_op))
                _dq_add(dq, it, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full, dq_empty, dq_offs, n_m, m_lo, off_hk,
                        off_b, H, sq_pad, WG, DQ_R0, DQ_C0, BLOCK_M, HEAD_D, DQ_ADD, DQ_WRITER)
                dk, ds_op = warpgroup_mma_wait(0, deps=(dk_tok, ds_op))
                mbarrier.arrive(empty.index(st))
            else:
                ds_op = gl.convert_layout(ds_lo, a_layout)
                dk_tok = warpgroup_mma(ds_op, q_t, dk, is_async=True)
                buf.slice(WG * KW, KW, dim=0).store(ds_lo)
                fence_async_shared()
                mbarrier.arrive(ds_bar.index(it % 2))
                # P and dS (register operands) die before the dQ accumulator is born: register pressure
                dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
                mbarrier.arrive(empty.index(st))
                if not DQ_LAG:
                    _dq_step(it, ds_smem, ds_bar, k_half, zero_dq, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full,
                             dq_empty, dq_offs, n_m, m_lo, off_hk, off_b, H, sq_pad, WG, DQ_R0, DQ_C0, DQ_M, BLOCK_M,
                             HEAD_D, DQ_ADD, DQ_WRITER)
    if DQ_LAG:
        if n_it > 0:
            _dq_step(n_it - 1, ds_smem, ds_bar, k_half, zero_dq, DQ, dq_desc, dq_buf, dq_buf4, dq_all, dq_full,
                     dq_empty, dq_offs, n_m, m_lo, off_hk, off_b, H, sq_pad, WG, DQ_R0, DQ_C0, DQ_M, BLOCK_M, HEAD_D,
                     DQ_ADD, DQ_WRITER)

    if DQ_ADD == 3 and not DQ_WRITER:
        tma.store_wait(0)
__NAN_GROUP__
    # the other consumer may still read this one's K rows (dQ) until both arrive here (phase 0); both halves
    # of dK / dV are in shared memory when both arrive again (phase 1), then one TMA store per tile
    mbarrier.arrive(fin)
    mbarrier.wait(fin, 0)
    k_w.store(dk.to(dtype))
    v_w.store(dv.to(dtype))
    fence_async_shared()
    mbarrier.arrive(fin)
    mbarrier.wait(fin, 1)
    if WG == 0:
        tma.async_copy_shared_to_global(dk_desc, [off_b, off_hk, n0, 0], k_smem)
        tma.async_copy_shared_to_global(dv_desc, [off_b, off_hk, n0, 0], v_smem)
        tma.store_wait(0)


@gluon.jit(do_not_specialize=["Sq", "Sk", "coff", "slb", "slh"])
def attn_bwd_ws(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, DQ, dq_desc, FLAG,
                __OPS_KPARAMS__slb, slh, slm, Sq, Sk, coff, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, DQ_LAG: gl.constexpr, DQ_ADD: gl.constexpr, DQ_WRITER: gl.constexpr,
                DQ_EARLY: gl.constexpr, STATS_SMEM: gl.constexpr, DQ_ALT: gl.constexpr):
    HEAD_D: gl.constexpr = q_desc.block_type.shape[3]
    dtype: gl.constexpr = q_desc.dtype
    KW: gl.constexpr = BLOCK_N // 2
    pid_n = gl.program_id(0)
    off_hk = gl.program_id(1)
    off_b = gl.program_id(2)
    H = gl.num_programs(1) * __G__
    n0 = pid_n * BLOCK_N
    m_lo = n0 * 0
    m_hi = Sq
__Q_RANGE__
    n_m = gl.cdiv(gl.maximum(m_hi - m_lo, 0), BLOCK_M)

    q_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_D], dtype)
    k_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
    ds_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    # TMA tiles are rank 4 (batch, head, rows, dim) so any batch / head strides work; the MMAs see rank 2
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_D], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_N, HEAD_D], v_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_l)
    if DQ_ADD == 3:     # one fp32 dQ half-tile per consumer (two tiles for the writer): TMA reduction sources
        dq_smem = gl.allocate_shared_memory(gl.float32, [4 if DQ_WRITER and not DQ_ALT else 2, 1, 1,
                                                         dq_desc.block_type.shape[2],
                                                         dq_desc.block_type.shape[3]], dq_desc.layout)
    else:
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, 1, 1, 8, 8], dq_desc.layout)
    # lse / delta rows per Q / dO stage (STATS_SMEM: the producer loads them; else a placeholder)
    st_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M if STATS_SMEM else 1], st_sl)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M if STATS_SMEM else 1], st_sl)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    fin = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(fin, count=2)
    for st in gl.static_range(STAGES):
        mbarrier.init(full.index(st), count=2 if STATS_SMEM else 1)   # TMA bytes (+ the producer's stats)
        mbarrier.init(empty.index(st), count=2)     # both consumers release a Q / dO slot
    for b in gl.static_range(2):
        mbarrier.init(ds_bar.index(b), count=2)     # both halves of dS are in shared memory
        mbarrier.init(dq_full.index(b), count=1 if DQ_ALT else 2)   # the tile's dQ block(s) are in the buffer
        mbarrier.init(ds_free.index(b), count=1)    # (DQ_ALT) the dQ reader is done with that dS buffer
        mbarrier.init(dq_empty.index(b), count=1)   # the writer's reductions have read that buffer
    fence_async_shared()

    q2 = q_smem._reinterpret(dtype, [STAGES, BLOCK_M, HEAD_D], q_l)
    do2 = do_smem._reinterpret(dtype, [STAGES, BLOCK_M, HEAD_D], q_l)
    # one [BLOCK_N, HEAD_D] tile each: a consumer's 64 keys are a row slice, its dQ columns a column slice
    k2 = k_smem._reinterpret(dtype, [BLOCK_N, HEAD_D], k_l)
    v2 = v_smem._reinterpret(dtype, [BLOCK_N, HEAD_D], k_l)
    if DQ_WRITER:   # a fourth partition, one warp: the dQ writer
        gl.warp_specialize([
__PARTITIONS__            (_bwd_dq_writer, (dq_desc, dq_smem, dq_full, dq_empty, off_b, off_hk, m_lo, n_m, BLOCK_M, HEAD_D,
                              DQ_ALT)),
        ], [4, 1, 1], [240, 24, 24])
    else:
        gl.warp_specialize([
__PARTITIONS__        ], [4, 1], [240, 24])
'''
_KERNEL = _KERNEL.replace("__PARTITIONS__", _PARTITIONS)

# the forward's prelude (imports, _tanh, _sigmoid) plus the TMA reduction the dQ path uses
_HEAD = _FWD_HEAD.replace("warpgroup_mma_wait)\n", "warpgroup_mma_wait)\n"
                          "from fa3_inductor.kernels.gluon_tma_reduce import async_reduce_add_shared_to_global\n", 1)


class _HopperBwdGen:
    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self.prog = spec.prog
        self.scale = self.prog.scale_only()
        self.nops = len(spec.operands)
        self.causal = self.prog.causal != "none"
        self.window = self.prog.window

    def raw_scale(self) -> bool:
        """With stats in shared memory, a positive scale-only program keeps x as the raw score: the exponent
        scales it and subtracts the (log2-unit) lse in one FMA (a masked x = -inf stays -inf)."""
        return self.scale is not None and self.scale > 0

    def score_fn(self, name: str, masked: bool, raw: bool = False) -> list[str]:
        """(x, ∂x/∂s) on a transposed tile: x in log2 units for a scale-only program (raw: the score itself),
        else natural units."""
        em = Emitter(self.spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)" if masked else None, ns="gl")
        if raw:
            body = ["x = s", f"d = {float(self.scale)!r}"]
        elif self.scale is not None:
            body = [f"x = s * {self.scale * LOG2E!r}", f"d = {float(self.scale)!r}"]
        else:
            root = em.emit(self.prog.expr)
            x = em.full_float(root)
            d = em._float(em.emit(derivative(self.prog.expr, ("score",))))
            body = em.lines + [f"x = {x}", f"d = {d}"]
        params = "".join(f"OP{n}b, st{n}_m, st{n}_n, " for n in range(self.nops))
        return ["@gluon.jit", f"def {name}(s, qi, kj, Sq, Sk, {params}):"] + [_ind(body + ["return x, d"]), "", ""]

    def visible(self) -> str:
        parts = ["(kj < Sk)", "(qi < Sq)"]
        if self.causal:
            parts.append("(kj <= qi + coff)")
            if self.window is not None:
                parts.append(f"(kj >= qi + coff - {self.window})")
        return _and(*parts)

    def tile_masked(self) -> list[str]:
        """A query tile needs the element predicate when it crosses Sq / Sk or the structural mask's edge."""
        lines = ["@gluon.jit",
                 "def _tile_masked(start_m, n0, Sq, Sk, coff, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):",
                 "    masked = (start_m + BLOCK_M > Sq) | (n0 + BLOCK_N > Sk)"]
        if self.causal:
            lines.append("    masked = masked | (start_m + coff < n0 + BLOCK_N - 1)")
            if self.window is not None:
                lines.append(f"    masked = masked | (n0 < start_m + BLOCK_M - 1 + coff - {self.window})")
        return lines + ["    return masked", "", ""]

    def q_range(self) -> str:
        """The query rows that see some key of [n0, n0 + BLOCK_N)."""
        lines = []
        if self.causal:
            lines.append("    m_lo = (gl.maximum(n0 - coff, 0) // BLOCK_M) * BLOCK_M")
            if self.window is not None:
                lines.append(f"    m_hi = gl.minimum(m_hi, gl.maximum(n0 + BLOCK_N - coff + {self.window}, 0))")
        return "\n".join(lines)

    def module(self) -> str:
        spec = self.spec
        ops_params, ops_args, bases = operand_text(spec, "            ")   # per query head: inside the walk
        nan_group = ""
        if self.prog.empty_row == "nan":    # eager: a (batch, K/V head) with an empty row has NaN dK / dV
            nan_group = ("    flag = gl.load(FLAG + off_b * (H // __G__) + off_hk)\n"
                         "    dk = gl.where(flag != 0, float('nan'), dk)\n"
                         "    dv = gl.where(flag != 0, float('nan'), dv)")
        if self.scale is not None:
            c2 = repr(self.scale * LOG2E) if self.raw_scale() else "1.0"     # x raw or in log2 units
            exp_p = f"gl.exp2(x - gl.expand_dims(lse * {LOG2E!r}, 0))"
            # stats from shared memory come pre-scaled (lse in log2 units, delta times the scale): one FFMA per
            # element for p's exponent and one for dP's
            stats = [("__LSE_ROW__", f"lse * {LOG2E!r}"), ("__DELTA_ROW__", f"delta * {float(self.scale)!r}"),
                     ("__EXP_P_ST__", f"gl.exp2(gl.fma(x, {c2}, -gl.expand_dims(lse, 0)))"),
                     ("__DS_ST__", "gl.where(p == 0.0, 0.0, p * (dp * dloc - gl.expand_dims(delta, 0)))")]
        else:
            exp_p = f"gl.exp2((x - gl.expand_dims(lse, 0)) * {LOG2E!r})"
            stats = [("__LSE_ROW__", "lse"), ("__DELTA_ROW__", "delta"), ("__EXP_P_ST__", exp_p),
                     ("__DS_ST__", "gl.where(p == 0.0, 0.0, p * (dp - gl.expand_dims(delta, 0))) * dloc")]
        text = _KERNEL
        for token, value in [("__OPS_KPARAMS__", ops_params), ("__OPS_PARAMS__", ops_params),
                             ("__OPS_KARGS__", ops_params), ("__OPS_ARGS__", ops_args),
                             ("__OPS_BASES__", "\n".join(bases)), ("__VISIBLE__", self.visible()),
                             ("__Q_RANGE__", self.q_range()), ("__NAN_GROUP__", nan_group),
                             ("__EXP_P__", exp_p), ("__G__", str(spec.G))] + stats:
            text = text.replace(token, value)
        fns = self.score_fn("_score_masked", True) + self.score_fn("_score_full", False) + self.tile_masked()
        fns += (self.score_fn("_score_masked_st", True, self.raw_scale())
                + self.score_fn("_score_full_st", False, self.raw_scale()))
        return _HEAD + "\n".join(fns) + text


def generate(spec: KernelSpec) -> str:
    return _HopperBwdGen(spec).module()
