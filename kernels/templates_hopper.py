"""Text of the generated Hopper (sm_90a) warp-specialized forward kernel, in Gluon, for one KernelSpec.

The schedule is FlashAttention-3's. One CTA owns 2 x BLOCK_M query rows of one (batch, head) and runs three
partitions (`gl.warp_specialize`):

    producer   1 warp, 24 registers. TMA-loads the two Q tiles (one per consumer, barrier q_bar[w]), then
               walks the key blocks through a STAGES-deep ring: waits k_empty[stage] (both consumers are done
               with that K slot), TMA-loads K (completes k_full[stage]); likewise V with v_empty / v_full.
    consumer 0 the default partition, 4 warps = one warpgroup, rows [m0, m0 + BLOCK_M);
    consumer 1 a worker partition, 4 warps, rows [m0 + BLOCK_M, m0 + 2 BLOCK_M); 240 registers each.

Each consumer (one warpgroup, wgmma with M = 64 rows) runs the intra-warpgroup pipeline: in iteration j it
issues S_j = Q K_jᵀ and O += P_{j-1} V_{j-1} back to back (async wgmma), waits for S_j only, computes the
score chain and online softmax of S_j while the PV product still runs, then waits for PV, rescales O and
releases the V slot (v_empty); the K slot is released as soon as S_j is done (k_empty). OVERLAP=False
waits for PV before the softmax instead (P's registers free while S is live: for key tiles whose S, P and O
do not fit 240 registers together; the other consumer's GEMMs still cover the softmax with PINGPONG). With
PINGPONG the two consumers take turns issuing their GEMMs (mbarriers turn[0] / turn[1]: a consumer waits for
its turn, issues, then hands the turn over), so one warpgroup's softmax runs under the other's GEMMs. The
epilogue writes O through shared memory (the Q buffer, when the head dims match) with a TMA store, and the
log-sum-exp with plain stores.

PERSISTENT (a constexpr, off by default; hopper.launch_args(persistent=True)): a grid of min(#SMs, work tiles)
CTAs, each walking work tiles (2 x BLOCK_M query rows of one (batch, head)) p, p + grid, ... of a static order
(_work: query blocks fastest, then heads, then batches; causal: the heaviest query blocks of every (batch, head)
first, LPT). All three partitions walk the same list and compute each tile's key range (_tile_range, tile lists
included) themselves; the K / V ring's slot count and phases, the q_bar phase and the ping-pong turns run on
across tiles, so the producer loads the next tile's first K while the consumers finish the current one, and its
Q as soon as q_empty[w] says consumer w is done with its Q buffer: after its last S when O has a buffer of its
own (SEP_O, where shared memory allows: hopper.separate_o; the next tile's epilogue waits for the previous O
store to have read it), after its O store has read the buffer when O goes out through Q's.

BLOCK_N2 (a constexpr, 0 by default; hopper.launch_args(block_n2=...), 16-bit only): key-split key blocks of
BLOCK_N + BLOCK_N2 keys (Gluon's tensors are powers of two, so FA3's 176-key tile becomes 128 + 32): the producer
fills each ring slot with two TMA boxes per operand completing on the slot's one barrier; a consumer issues two S
products (s, s2), takes one row max and one rescale for both, and chains two P·V products on its accumulator.

PREFETCH (a constexpr, off by default; hopper.launch_args(prefetch=True), programs with score operands): a key
block's operands are loaded at the top of the block (_ops_masked / _ops_full), before its K wait and S product, so
their global-load latency runs under the GEMMs; the chain then reads the values (_vscore_*). Without it the loads
issue once S is done, ahead of the softmax. OVERLAP=False (above) is the other operand schedule: P's registers are
free while S is live, which keeps dense operands at head dim 128 out of local memory.

The score chain (scale, biases, masks, soft-capping) is the same ScoreProgram the portable kernel compiles,
emitted by codegen.Emitter in Gluon spelling. A positive pure scale is folded into the exponent: the row max is
taken on the raw scores and scaled once per row (m in log2 units), and p = exp2(s·qk - m) is one FFMA and
one MUFU per score (qk = scale·log2 e); any other chain stays in natural units and the softmax scales by
log2 e after subtracting the row max, so finfo.min fills never overflow to -inf (eager's uniform rows stay
uniform).

FP8 (e4m3 Q, K, V from kernels/fp8_quant.py; the same schedule on QGMMA, K = 32 per instruction). V arrives
transposed (B, H, Dv, S), so both operands of P·V are k-major as 8-bit wgmma requires. The descales fold
into qk per tile (qk = q_scale · k_scale · scale · log2 e: one scalar multiply); the tile's K and V scales
are loaded before its barrier waits. P enters the PV product as e4m3(p · 2^8) (the 2^8 is -8 in the FFMA's
max term; l sums the same scaled p and lse removes it), converted right before the product without data
movement: the 8-bit A operand wants 4 consecutive keys per register where the accumulator gives a thread
keys {2t, 2t+1, 8+2t, 9+2t} of each 16, so P's keys are renamed in registers (_p_fp8) and the quantize pass
stores V's keys in that order (fp8_quant.wgmma_key_order); 4 values become one register with two cvt and
one byte permute. V's scale is folded into the accumulator's rescale (acc in units of the last V tile), so
the epilogue multiplies by the last V scale over l. A key tile larger than 128 keys has one K / V scale
(fp8_quant_blocks).

Softmax knobs (constexprs, all off by default; hopper.Fp8Schedule; measured by bench/fp8_variants.py). At FP8
D=128 one warp's trip through a key tile (~1350 cycles alone: 64 MUFU.EX2 back to back, 31-deep FMNMX and
FADD chains) is 2.5x the other warpgroup's GEMMs (512 cycles), so the softmax, not the tensor cores, sets
the pace and ping-pong only serialises the two softmaxes. EMU: EMU of every 8 exp2 on the FMA pipe
(kernels/fp8_exp2.py) instead of MUFU. TREE: row max (and, without LSUM, row sum) as reduction trees over
register halves, not chains. LSUM: the row sum is P times a ones tile (one 64x8 wgmma per 32 keys on P's
registers; l then sums the same e4m3 P the numerator used) instead of 64 FADDs and shuffles. LATE: O's rescale
and FP8's P conversion move between the S and the PV issue of the next trip. JOIN: the exp2 after the
masked / unmasked branches join (one copy; ptxas interleaves it with the row sum and hoists the PV wait above
it). MID: PV waited and O rescaled between the row max and the exp2.
"""

from __future__ import annotations

import math

from . import fp8_exp2, mask_tiles
from .codegen import LOG2E, Emitter, KernelSpec
from .templates import P_SCALE
from .templates_bwd import _and, _ind

# The wait for P·V (and with LSUM P·1, whose tile sum joins l in fp32), at its three places in the key loop
_PV_WAIT = """            if LSUM:
                acc, l_tile = warpgroup_mma_wait(0, deps=(o_tok, l_tok))
                l_acc = l_acc + l_tile
            else:
                acc = warpgroup_mma_wait(0, deps=(o_tok,))
"""

_KERNEL = '''
@gluon.jit
def _producer_tile(q_desc, k_desc, v_desc, k2_desc, v2_desc, q_smem, k_smem, v_smem, k2_smem, v2_smem, q_bar, q_empty,
                   k_full, v_full, k_empty, v_empty, off_b, off_h, off_hk, m0, lo, n_tiles, kv, t, __TLA__
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PERSISTENT: gl.constexpr,
                   BLOCK_N2: gl.constexpr):
    """The loads of one work tile: its two Q tiles and its n_tiles key blocks through the ring, from the CTA's
    kv-th key block on (slot kv % STAGES; the ring's phases run on across a persistent CTA's tiles); t: the
    CTA's earlier work tiles (q_bar / q_empty phases). With BLOCK_N2, a key block is BLOCK_N + BLOCK_N2 keys in
    two TMA boxes per operand (boxes are powers of two) completing on the same barrier."""
    NT: gl.constexpr = BLOCK_N + BLOCK_N2
    if not PERSISTENT:
        for w in gl.static_range(2):
            mbarrier.expect(q_bar.index(w), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [off_b, off_h, m0 + w * BLOCK_M, 0], q_bar.index(w),
                                            q_smem.index(w))
    for i in range(n_tiles):
        start_n = _tile_start(i, lo, __TLA__NT)
        st = (kv + i) % STAGES
        ph = ((kv + i) // STAGES) & 1
        # a fresh barrier passes a wait on parity 1, so the first STAGES loads do not wait
        mbarrier.wait(k_empty.index(st), ph ^ 1)
        if BLOCK_N2 > 0:
            mbarrier.expect(k_full.index(st), k_desc.block_type.nbytes + k2_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k2_desc, [off_b, off_hk, start_n + BLOCK_N, 0], k_full.index(st),
                                            k2_smem.index(st))
        else:
            mbarrier.expect(k_full.index(st), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [off_b, off_hk, start_n, 0], k_full.index(st), k_smem.index(st))
        if PERSISTENT:
            if i == 0:
                # Q after the first K: that slot frees while the consumers still run the previous tile, Q only
                # once a consumer's last S (or, when O aliases Q, its O store) is done
                for w in gl.static_range(2):
                    mbarrier.wait(q_empty.index(w), (t & 1) ^ 1)
                    mbarrier.expect(q_bar.index(w), q_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(q_desc, [off_b, off_h, m0 + w * BLOCK_M, 0], q_bar.index(w),
                                                    q_smem.index(w))
        mbarrier.wait(v_empty.index(st), ph ^ 1)
        if BLOCK_N2 > 0:     # 16-bit only: V's rows are keys
            mbarrier.expect(v_full.index(st), v_desc.block_type.nbytes + v2_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v2_desc, [off_b, off_hk, start_n + BLOCK_N, 0], v_full.index(st),
                                            v2_smem.index(st))
        else:
            mbarrier.expect(v_full.index(st), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, __V_COORD__, v_full.index(st), v_smem.index(st))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, k2_desc, v2_desc, q_smem, k_smem, v_smem, k2_smem, v2_smem, q_bar, q_empty,
              k_full, v_full, k_empty, v_empty, off_b, off_h, off_hk, m0, lo, n_tiles, __TLX__n_b, n_h, Sq, Sk, coff,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PERSISTENT: gl.constexpr,
              BLOCK_N2: gl.constexpr):
    NT: gl.constexpr = BLOCK_N + BLOCK_N2
    if PERSISTENT:
        n_m = gl.cdiv(Sq, 2 * BLOCK_M)
        kv = 0
        t = 0
        for tile in range(gl.program_id(0), n_m * n_h * n_b, gl.num_programs(0)):
            w_m, w_h, w_b = _work(tile, n_m, n_h, n_b)
            w_hk, w_m0, w_lo, w_n__TLW_RET__ = _tile_range(w_m, w_h, w_b, Sk, coff, __TLP__BLOCK_M, NT)
            _producer_tile(q_desc, k_desc, v_desc, k2_desc, v2_desc, q_smem, k_smem, v_smem, k2_smem, v2_smem, q_bar,
                           q_empty, k_full, v_full, k_empty, v_empty, w_b, w_h, w_hk, w_m0, w_lo, w_n, kv, t,
                           __TLAW__BLOCK_M, BLOCK_N, STAGES, True, BLOCK_N2)
            kv += w_n
            t += 1
    else:
        _producer_tile(q_desc, k_desc, v_desc, k2_desc, v2_desc, q_smem, k_smem, v_smem, k2_smem, v2_smem, q_bar,
                       q_empty, k_full, v_full, k_empty, v_empty, off_b, off_h, off_hk, m0, lo, n_tiles, 0, 0,
                       __TLA__BLOCK_M, BLOCK_N, STAGES, False, BLOCK_N2)


@gluon.jit
def _work(tile, n_m, n_h, n_b):
    """(query block, head, batch) of work tile `tile` of the persistent schedule (static: CTA p takes tiles p,
    p + grid, ...)."""
__WORK_ORDER__
    return pid_m, bh % n_h, bh // n_h


@gluon.jit
def _tile_range(pid_m, off_h, off_b, Sk, coff, __TLP__BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """(KV head, first query row, first key, key blocks[, tile-list offset]) of query block pid_m of (off_b, off_h)."""
    off_hk = off_h // __G__
    m0 = pid_m * (2 * BLOCK_M)
    lo = 0
    hi = Sk
__KV_RANGE__
    # every consumer runs at least one (masked) tile, so the barrier schedule has one shape
    hi = gl.maximum(hi, lo + 1)
__N_TILES__
    return off_hk, m0, lo, n_tiles__TL_RET__


@gluon.jit
def _scores(s, qi, kj, Sq, Sk, coff, __OPS_ARGS____OPV_PARAMS__MASKED: gl.constexpr, NEUTRAL: gl.constexpr,
            PREFETCH: gl.constexpr):
    """x of one tile of scores: the chain (or the raw scores, where the scale folds into the softmax), hidden
    positions at -inf where the tile may have some. PREFETCH: the operands arrive as values (OPV...) loaded at the
    top of the key block (_ops_masked / _ops_full), not as pointers."""
    if NEUTRAL:
        x = _score_neutral(s, qi, kj, Sq, Sk, __OPS_ARGS__)
    elif MASKED:
        if PREFETCH:
            x = _vscore_masked(s, qi, kj, Sq, Sk, __OPV_PARAMS__)
        else:
            x = _score_masked(s, qi, kj, Sq, Sk, __OPS_ARGS__)
    else:
        if PREFETCH:
            x = _vscore_full(s, qi, kj, Sq, Sk, __OPV_PARAMS__)
        else:
            x = _score_full(s, qi, kj, Sq, Sk, __OPS_ARGS__)
    if MASKED:
        x = gl.where(__VISIBLE__, x, float("-inf"))
    return x


@gluon.jit
def _softmax_step2(s, s2, m_i, qk, qi, qi2, kj, kj2, Sq, Sk, coff, __OPS_ARGS__MASKED: gl.constexpr,
                   NEUTRAL: gl.constexpr):
    """(p, p2, m_new, alpha) of a key block in two parts (BLOCK_N + BLOCK_N2 keys, s and s2; qi2 / kj2: s2's
    rows and keys): one row max and one rescale for both. Rows sit on the same threads in both accumulators,
    so the row vectors move between their layouts without data movement."""
    row2_l: gl.constexpr = gl.SliceLayout(1, s2.type.layout)
    x = _scores(s, qi, kj, Sq, Sk, coff, __OPS_ARGS____OPV_ZEROS__MASKED, NEUTRAL, False)
    x2 = _scores(s2, qi2, kj2, Sq, Sk, coff, __OPS_ARGS____OPV_ZEROS__MASKED, NEUTRAL, False)
    m_new = gl.maximum(m_i, gl.maximum(__ROWMAX_X__, gl.convert_layout(__ROWMAX_X2__, m_i.type.layout,
                                                                       assert_trivial=True)))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    m_use2 = gl.convert_layout(m_use, row2_l, assert_trivial=True)
    alpha = gl.exp2(__ALPHA_EXP__)
    p = gl.exp2(__P_EXP_X__)
    p2 = gl.exp2(__P_EXP_X2__)
    return p, p2, m_new, alpha


@gluon.jit
def _softmax_step(s, m_i, qk, qi, kj, Sq, Sk, coff, __OPS_ARGS____OPV_PARAMS__MASKED: gl.constexpr,
                  NEUTRAL: gl.constexpr, EMU: gl.constexpr, TREE: gl.constexpr, SPLIT: gl.constexpr,
                  PREFETCH: gl.constexpr):
    """(p, m_new, alpha) of one tile; with SPLIT the exponent of p instead of p (the caller takes the exp2
    after the masked / unmasked branches join, where ptxas may schedule it among other work). PREFETCH: the
    operands arrive as values (OPV...) loaded at the top of the key block, not as pointers."""
    x = _scores(s, qi, kj, Sq, Sk, coff, __OPS_ARGS____OPV_PARAMS__MASKED, NEUTRAL, PREFETCH)
    if TREE:
        m_new = gl.maximum(m_i, gl.convert_layout(_tree_max(x), m_i.type.layout, assert_trivial=True)__ROWSCALE__)
    else:
        m_new = gl.maximum(m_i, __ROWMAX__)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(__ALPHA_EXP__)
    if SPLIT:
        p = __P_EXP__
    else:
        p = _exp2_mix(__P_EXP__, EMU)
    return p, m_new, alpha


@gluon.jit
def _halve(x, MAX: gl.constexpr):
    """Column c and c + N/2 of each row combined: the top column bit of the wgmma accumulator is a register
    index, so this is one independent instruction per pair (a reduction tree, not a dependent chain)."""
    return _reduce(gl.reshape(x, [x.shape[0], 2, x.shape[1] // 2]), MAX)


@gluon.jit
def _reduce(x, MAX: gl.constexpr):
    """Max or sum over axis 1."""
    if MAX:
        r = gl.max(x, 1)
    else:
        r = gl.sum(x, 1)
    return r


@gluon.jit
def _tree_reduce(x, MAX: gl.constexpr):
    """Row max / sum in log2(N) levels of independent pairs down to 8 columns (2 registers x 4 lanes), where
    the plain reduction (one add, two shuffles) finishes: the in-thread chain of gl.max / gl.sum is N/4 deep."""
    if x.shape[1] > 128:
        x = _halve(x, MAX)
    if x.shape[1] > 64:
        x = _halve(x, MAX)
    if x.shape[1] > 32:
        x = _halve(x, MAX)
    if x.shape[1] > 16:
        x = _halve(x, MAX)
    if x.shape[1] > 8:
        x = _halve(x, MAX)
    return _reduce(x, MAX)


@gluon.jit
def _tree_max(x):
    return _tree_reduce(x, True)


@gluon.jit
def _row_sum(p, like, TREE: gl.constexpr):
    if TREE:
        r = gl.convert_layout(_tree_reduce(p, False), like.type.layout, assert_trivial=True)
    else:
        r = gl.sum(p, 1)
    return r


@gluon.jit
def _exp2_mix(x, EMU: gl.constexpr):
    """2^x; with EMU > 0, EMU of every 8 scores on the FMA pipe (kernels/fp8_exp2.py), the rest on MUFU."""
__EXP2_MIX__


@gluon.jit
def _p_fp8(p, p_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """P (accumulator layout) as the e4m3 A operand of P·V with no data movement: in each group of 16 keys,
    a thread's accumulator holds keys {2t, 2t+1, 8+2t, 9+2t} (t = lane % 4) where the 8-bit A operand wants
    4 consecutive keys, so P's keys are reordered 16g + 8a + 2t + b -> 16g + 4t + 2a + b (a register
    renaming) and V's keys come from the quantize pass in the same order (fp8_quant.wgmma_key_order)."""
    p5 = gl.permute(gl.reshape(p, [BLOCK_M, BLOCK_N // 16, 2, 4, 2]), [0, 1, 3, 2, 4])
    # in the operand layout (only the register order changes), each 4 consecutive registers are the 4 keys of
    # one 32-bit A register: 2 cvt + 1 byte permute (the generic fp8 cast repacks byte by byte)
    pk = gl.convert_layout(gl.reshape(p5, [BLOCK_M, BLOCK_N]), p_layout, assert_trivial=True)
    return gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [pk], dtype=gl.int8, is_pure=True, pack=4).to(gl.float8e4nv,
                                                                                                  bitcast=True)


@gluon.jit
def _tile_masked(start_n, row0, Sk, coff, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """True when some (row, key) of the tile may be hidden: key bounds or the structural mask."""
    masked = start_n + BLOCK_N > Sk
__TILE_MASKED__    return masked


@gluon.jit
def _consumer_tile(q_smem, k_smem, v_smem, k2_smem, v2_smem, o_smem, o4, ones_smem, q_bar, q_empty, k_full, v_full,
                   k_empty, v_empty, turn, o_desc, LSE, slb, slh, slm, off_b, off_h, m0, lo, n_tiles, kv, t, turn_ph,
                   __TLA__Sq, Sk, coff, __FP8P____OPS_PARAMS__WG: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, HEAD_DV: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                   OVERLAP: gl.constexpr, EMU: gl.constexpr, TREE: gl.constexpr, LATE: gl.constexpr,
                   LSUM: gl.constexpr, MID: gl.constexpr, JOIN: gl.constexpr, PERSISTENT: gl.constexpr,
                   O_ALIAS: gl.constexpr, BLOCK_N2: gl.constexpr, PREFETCH: gl.constexpr):
    """One work tile of consumer WG: its rows of query block m0, key blocks from the CTA's kv-th on (the ring's
    phases run on across a persistent CTA's tiles, as do the ping-pong turns: turn_ph in, the next one out).
    BLOCK_N2 > 0 (16-bit, default softmax knobs): each key block is BLOCK_N + BLOCK_N2 keys, two S products
    (s, s2) and two PV products chained on one accumulator, one row max / rescale for both."""
    SPLIT: gl.constexpr = MID or JOIN
    NT: gl.constexpr = BLOCK_N + BLOCK_N2       # keys per key block
    gl.static_assert(BLOCK_N2 == 0 or not (SPLIT or LATE or LSUM or EMU > 0 or TREE or PREFETCH),
                     "key-split blocks take the default softmax")
    dtype: gl.constexpr = q_smem.dtype
    out_dtype: gl.constexpr = o_smem.dtype
    KI: gl.constexpr = 256 // dtype.primitive_bitwidth       # wgmma K per instruction: 16 (16-bit), 32 (fp8)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, KI])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DV, KI])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                 k_width=32 // dtype.primitive_bitwidth)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    # LSUM: the row sum as P times a ones tile (a [BLOCK_M, 8] accumulator), sharing P's registers with PV
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, KI])
    lp_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout,
                                                  k_width=32 // dtype.primitive_bitwidth)
    lrow_l: gl.constexpr = gl.SliceLayout(1, l_layout)
    # the second part of a key-split block (a valid layout even when there is none)
    N2L: gl.constexpr = BLOCK_N2 if BLOCK_N2 > 0 else 8
    s2_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N2L, KI])
    row2_l: gl.constexpr = gl.SliceLayout(1, s2_layout)
    col2_l: gl.constexpr = gl.SliceLayout(0, s2_layout)
    # groups issued after S (and S2): PV (and P·1, or P2·V2)
    WAIT_S: gl.constexpr = 2 if (LSUM or BLOCK_N2 > 0) else 1
__OPS_BASES__
    row0 = m0 + WG * BLOCK_M
    qi = gl.expand_dims(row0 + gl.arange(0, BLOCK_M, row_l), 1)
    if BLOCK_N2 > 0:
        qi2 = gl.expand_dims(row0 + gl.arange(0, BLOCK_M, row2_l), 1)
        zero_s2 = gl.zeros([BLOCK_M, BLOCK_N2], gl.float32, s2_layout)
    q = q_smem.index(WG)
    mbarrier.wait(q_bar.index(WG), t & 1)
__FP8_Q__
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DV], gl.float32, o_layout)
    # LSUM: each tile's P·1 starts from zero and joins l_acc in fp32 registers. Chained across tiles on the
    # tensor core, the FP8 accumulator keeps only ~14 bits relative to the running sum (DeepSeek-V3, 3.3.2),
    # which only grows: later tiles' row sums lost their low bits (RMSE 18x the default's on the H100)
    zero_l = gl.zeros([BLOCK_M, 8], gl.float32, l_layout)
    l_acc = zero_l
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
__QK0__    i = kv

    # prologue: S_0 and its softmax
__PREFETCH0____FP8_LOAD0__    mbarrier.wait(k_full.index(i % STAGES), (i // STAGES) & 1)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), turn_ph)
        turn_ph ^= 1
    s_tok = warpgroup_mma(q, k_smem.index(i % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    if BLOCK_N2 > 0:
        s2_tok = warpgroup_mma(q, k2_smem.index(i % STAGES).permute((1, 0)), zero_s2, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    if BLOCK_N2 > 0:
        s, s2 = warpgroup_mma_wait(0, deps=(s_tok, s2_tok))
    else:
        s = warpgroup_mma_wait(0, deps=(s_tok,))
    mbarrier.arrive(k_empty.index(i % STAGES))
__FP8_S0__    kj = gl.expand_dims(_tile_start(0, lo, __TLA__NT) + gl.arange(0, BLOCK_N, col_l), 0)
__STEP0__
    if SPLIT:
        p = _exp2_mix(p_arg, EMU)
    else:
        p = p_arg
    if not LSUM:
        l_i = _row_sum(p, m_i, TREE)
        if BLOCK_N2 > 0:
            l_i = l_i + gl.convert_layout(gl.sum(p2, 1), row_l, assert_trivial=True)
    alpha_o = gl.full([BLOCK_M], 1.0, gl.float32, orow_l)    # LATE: O's pending rescale
    alpha_l = gl.full([BLOCK_M], 1.0, gl.float32, lrow_l)
__P_OP_PRO__    if BLOCK_N2 > 0:
        p2_op = gl.convert_layout(p2.to(dtype), p_layout, assert_trivial=True)
    for j in range(1, n_tiles):
        start_n = _tile_start(j, lo, __TLA__NT)
        cur = i % STAGES
        cur_ph = (i // STAGES) & 1
        nxt = (i + 1) % STAGES
        nxt_ph = ((i + 1) // STAGES) & 1
__PREFETCHJ____FP8_LOADJ____P_OP_TOP__        mbarrier.wait(k_full.index(nxt), nxt_ph)
        if PINGPONG:
            mbarrier.wait(turn.index(WG), turn_ph)
            turn_ph ^= 1
        s_tok = warpgroup_mma(q, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        if BLOCK_N2 > 0:
            s2_tok = warpgroup_mma(q, k2_smem.index(nxt).permute((1, 0)), zero_s2, use_acc=False, is_async=True)
        if LATE:    # under S's GEMM rather than between the softmax and its issue
            acc = acc * gl.expand_dims(alpha_o, 1)
            if LSUM:
                l_acc = l_acc * gl.expand_dims(alpha_l, 1)
__P_OP_LATE__        mbarrier.wait(v_full.index(cur), cur_ph)
        o_tok = warpgroup_mma(p_op, v_smem.index(cur)__VT__, acc, is_async=True)
        if BLOCK_N2 > 0:
            o_tok = warpgroup_mma(p2_op, v2_smem.index(cur), o_tok, is_async=True)
        if LSUM:
            l_tok = warpgroup_mma(gl.convert_layout(p_op, lp_layout, assert_trivial=True),
                                  ones_smem.permute((1, 0)), zero_l, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))
        if BLOCK_N2 > 0:
            s, s2 = warpgroup_mma_wait(WAIT_S, deps=(s_tok, s2_tok))
        else:
            s = warpgroup_mma_wait(WAIT_S, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(nxt))   # K is read only by S; its slot refills while PV still runs
        if not OVERLAP:     # PV done before the softmax: P's registers are free while S is live
__PV_WAIT__            mbarrier.arrive(v_empty.index(cur))
__FP8_SJ__        kj = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, col_l), 0)
        masked = _tile_masked(start_n, row0, Sk, coff, BLOCK_M, NT)
__STEPJ__
        if OVERLAP and MID:     # PV waited after the row max: O's rescale can issue among the exps
__PV_WAIT__            mbarrier.arrive(v_empty.index(cur))
        if MID and not LATE:
            acc = acc * gl.expand_dims(gl.convert_layout(__ALPHA__, orow_l), 1)
            if LSUM:
                l_acc = l_acc * gl.expand_dims(gl.convert_layout(alpha, lrow_l), 1)
        if SPLIT:
            p = _exp2_mix(p_arg, EMU)
        else:
            p = p_arg
        if OVERLAP and not MID:
__PV_WAIT__            mbarrier.arrive(v_empty.index(cur))
        if LATE:
            alpha_o = gl.convert_layout(__ALPHA__, orow_l)
            alpha_l = gl.convert_layout(alpha, lrow_l)
        elif not MID:
            acc = acc * gl.expand_dims(gl.convert_layout(__ALPHA__, orow_l), 1)
            if LSUM:
                l_acc = l_acc * gl.expand_dims(gl.convert_layout(alpha, lrow_l), 1)
        if not LSUM:
            l_i = l_i * alpha + _row_sum(p, m_i, TREE)
            if BLOCK_N2 > 0:
                l_i = l_i + gl.convert_layout(gl.sum(p2, 1), row_l, assert_trivial=True)
        m_i = m_new
__P_OP_END__        if BLOCK_N2 > 0:
            p2_op = gl.convert_layout(p2.to(dtype), p_layout, assert_trivial=True)
        i += 1

    if PERSISTENT and not O_ALIAS:
        mbarrier.arrive(q_empty.index(WG))     # Q is read by S only: the next tile's Q may load

    # the last PV product
    cur = i % STAGES
    cur_ph = (i // STAGES) & 1
__P_OP_LAST__    mbarrier.wait(v_full.index(cur), cur_ph)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), turn_ph)
        turn_ph ^= 1
    if LATE:
        acc = acc * gl.expand_dims(alpha_o, 1)
        if LSUM:
            l_acc = l_acc * gl.expand_dims(alpha_l, 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(cur)__VT__, acc, is_async=True)
    if BLOCK_N2 > 0:
        o_tok = warpgroup_mma(p2_op, v2_smem.index(cur), o_tok, is_async=True)
    if LSUM:
        l_tok = warpgroup_mma(gl.convert_layout(p_op, lp_layout, assert_trivial=True), ones_smem.permute((1, 0)),
                              zero_l, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    if LSUM:
        acc, l_tile = warpgroup_mma_wait(0, deps=(o_tok, l_tok))
        l_acc = l_acc + l_tile
        # every column of l_acc is the row sum of e4m3(256 p): the same P the numerator saw
        l_i = gl.convert_layout(gl.max(l_acc, 1), row_l)
    else:
        acc = warpgroup_mma_wait(0, deps=(o_tok,))
    mbarrier.arrive(v_empty.index(cur))

    empty = m_i == float("-inf")
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), __LSE__)
    out = acc * gl.expand_dims(gl.convert_layout(__OUT_SCALE__ / l_safe, orow_l), 1)
__EMPTY_ROWS__
    o_buf = o_smem.index(WG)
    if PERSISTENT and not O_ALIAS:
        tma.store_wait(0)       # the previous tile's O store has read the buffer
    o_buf.store(out.to(out_dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [off_b, off_h, row0, 0], o4.index(WG))
    rows = row0 + gl.arange(0, BLOCK_M, row_l)
    gl.store(LSE + off_b.to(gl.int64) * slb + off_h.to(gl.int64) * slh + rows * slm, lse, mask=rows < Sq)
    if not PERSISTENT:
        tma.store_wait(0)
    elif O_ALIAS:
        tma.store_wait(0)       # O went out through Q's buffer: only now may the next tile's Q load into it
        mbarrier.arrive(q_empty.index(WG))
    return turn_ph


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, k2_smem, v2_smem, o_smem, o4, ones_smem, q_bar, q_empty, k_full, v_full, k_empty,
              v_empty, turn, o_desc, LSE, slb, slh, slm, off_b, off_h, m0, lo, n_tiles, __TLX__n_b, n_h, Sq, Sk, coff,
              __FP8P____OPS_PARAMS__WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DV: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, OVERLAP: gl.constexpr,
              EMU: gl.constexpr, TREE: gl.constexpr, LATE: gl.constexpr, LSUM: gl.constexpr, MID: gl.constexpr,
              JOIN: gl.constexpr, PERSISTENT: gl.constexpr, O_ALIAS: gl.constexpr, BLOCK_N2: gl.constexpr,
              PREFETCH: gl.constexpr):
    NT: gl.constexpr = BLOCK_N + BLOCK_N2
    # consumer 0 takes the first turn
    if PERSISTENT:
        n_m = gl.cdiv(Sq, 2 * BLOCK_M)
        kv = 0
        t = 0
        turn_ph = 1 - WG
        for tile in range(gl.program_id(0), n_m * n_h * n_b, gl.num_programs(0)):
            w_m, w_h, w_b = _work(tile, n_m, n_h, n_b)
            w_hk, w_m0, w_lo, w_n__TLW_RET__ = _tile_range(w_m, w_h, w_b, Sk, coff, __TLP__BLOCK_M, NT)
            turn_ph = _consumer_tile(q_smem, k_smem, v_smem, k2_smem, v2_smem, o_smem, o4, ones_smem, q_bar, q_empty,
                                     k_full, v_full, k_empty, v_empty, turn, o_desc, LSE, slb, slh, slm, w_b, w_h,
                                     w_m0, w_lo, w_n, kv, t, turn_ph, __TLAW__Sq, Sk, coff, __FP8P____OPS_PARAMS__WG,
                                     BLOCK_M, BLOCK_N, HEAD_DV, STAGES, PINGPONG, OVERLAP, EMU, TREE, LATE, LSUM, MID,
                                     JOIN, True, O_ALIAS, BLOCK_N2, PREFETCH)
            kv += w_n
            t += 1
        if not O_ALIAS:
            tma.store_wait(0)
    else:
        _consumer_tile(q_smem, k_smem, v_smem, k2_smem, v2_smem, o_smem, o4, ones_smem, q_bar, q_empty, k_full, v_full,
                       k_empty, v_empty, turn, o_desc, LSE, slb, slh, slm, off_b, off_h, m0, lo, n_tiles, 0, 0, 1 - WG,
                       __TLA__Sq, Sk, coff, __FP8P____OPS_PARAMS__WG, BLOCK_M, BLOCK_N, HEAD_DV, STAGES, PINGPONG,
                       OVERLAP, EMU, TREE, LATE, LSUM, MID, JOIN, False, O_ALIAS, BLOCK_N2, PREFETCH)


@gluon.jit(do_not_specialize=["Sq", "Sk", "coff", "slb", "slh", "n_b", "n_h"])
def attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, k2_desc, v2_desc, LSE, __FP8P____OPS_KPARAMS____TLP__slb, slh, slm, Sq, Sk,
                coff, n_b, n_h, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                PINGPONG: gl.constexpr, OVERLAP: gl.constexpr = True, EMU: gl.constexpr = 0, TREE: gl.constexpr = False,
                LATE: gl.constexpr = False, LSUM: gl.constexpr = False, MID: gl.constexpr = False,
                JOIN: gl.constexpr = False, PERSISTENT: gl.constexpr = False, SEP_O: gl.constexpr = False,
                BLOCK_N2: gl.constexpr = 0, PREFETCH: gl.constexpr = False):
    HEAD_D: gl.constexpr = q_desc.block_type.shape[3]
    HEAD_DV: gl.constexpr = o_desc.block_type.shape[3]
    dtype: gl.constexpr = q_desc.dtype
    out_dtype: gl.constexpr = o_desc.dtype
    if PERSISTENT:      # each partition walks its CTA's work tiles (_work); no tile of the CTA's own
        off_b = 0
        off_h = 0
        off_hk = 0
        m0 = 0
        lo = 0
        n_tiles = 0
__TL_ZERO__    else:
        pid_m = gl.program_id(0)
        off_h = gl.program_id(1)
        off_b = gl.program_id(2)
__CAUSAL_ORDER__
        off_hk, m0, lo, n_tiles__TL_RET__ = _tile_range(pid_m, off_h, off_b, Sk, coff, __TLP__BLOCK_M,
                                                        BLOCK_N + BLOCK_N2)

    q_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_D], dtype)
    k_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
    v_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for(__V_TILE__, dtype)
    o_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DV], out_dtype)
    # TMA tiles are rank 4 (batch, head, rows, dim) so any batch / head strides work; the MMAs see rank 2
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1] + __V_TILE__, v_desc.layout)
    # key-split blocks (16-bit): the second part's K / V ring, filled on the same barriers as the first
    if BLOCK_N2 > 0:
        k2_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N2, HEAD_D], k2_desc.layout)
        v2_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N2, HEAD_DV], v2_desc.layout)
    else:
        k2_smem = k_smem
        v2_smem = v_smem
    # SEP_O: a buffer of its own even where O could go out through Q's, so that a persistent CTA's next Q
    # loads while this tile's O is still being stored
    O_ALIAS: gl.constexpr = HEAD_D == HEAD_DV and dtype == out_dtype and not SEP_O
    if O_ALIAS:
        o_smem = q_smem      # Q is dead once a consumer's last S is computed
    else:
        o_smem = gl.allocate_shared_memory(out_dtype, [2, 1, 1, BLOCK_M, HEAD_DV], o_desc.layout)
    # LSUM's ones tile is allocated before the barriers: the allocator may place a buffer in the bytes of one
    # already dead (turn, without ping-pong, dies at its init), and thread 0's mbarrier.init is not ordered with
    # the other threads' stores, so a later buffer there had ones overwritten by barrier words (l 25x too large)
    if LSUM:
        ones_reg: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [2, 2], [1, 0])
        ones_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], dtype)
        # e4m3 1.0 written as its byte (0x38): the fp16 -> e4m3 conversion of a constant tile came out wrong on
        # the H100 (bench/lsum_repro.py: P·ones read B as ~-87 or 0.5 depending on context; a TMA-loaded or
        # byte-built tile is right) — the l 25x too large that kept LSUM off
        ones_smem = gl.allocate_shared_memory(dtype, [8, BLOCK_N], ones_l,
                                              gl.full([8, BLOCK_N], 0x38, gl.int8, ones_reg).to(dtype, bitcast=True))
    else:
        ones_smem = q_smem
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    if PERSISTENT:      # consumer w is done with its Q buffer
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(2):
            mbarrier.init(q_empty.index(w), count=1)
    else:
        q_empty = q_bar
    for w in gl.static_range(2):
        mbarrier.init(q_bar.index(w), count=1)
        if PINGPONG:
            mbarrier.init(turn.index(w), count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_full.index(st), count=1)
        mbarrier.init(v_full.index(st), count=1)
        mbarrier.init(k_empty.index(st), count=2)    # both consumers release a slot
        mbarrier.init(v_empty.index(st), count=2)
    fence_async_shared()

    q2 = q_smem._reinterpret(dtype, [2, BLOCK_M, HEAD_D], q_l)
    k2 = k_smem._reinterpret(dtype, [STAGES, BLOCK_N, HEAD_D], k_l)
    v2 = v_smem._reinterpret(dtype, [STAGES] + __V_TILE__, v_l)
    o2 = o_smem._reinterpret(out_dtype, [2, BLOCK_M, HEAD_DV], o_l)
    if BLOCK_N2 > 0:
        kb2 = k2_smem._reinterpret(dtype, [STAGES, BLOCK_N2, HEAD_D],
                                   gl.NVMMASharedLayout.get_default_for([BLOCK_N2, HEAD_D], dtype))
        vb2 = v2_smem._reinterpret(dtype, [STAGES, BLOCK_N2, HEAD_DV],
                                   gl.NVMMASharedLayout.get_default_for([BLOCK_N2, HEAD_DV], dtype))
    else:
        kb2 = k2
        vb2 = v2
    gl.warp_specialize([
        (_consumer, (q2, k2, v2, kb2, vb2, o2, o_smem, ones_smem, q_bar, q_empty, k_full, v_full, k_empty, v_empty, turn,
                     o_desc, LSE, slb, slh, slm, off_b, off_h, m0, lo, n_tiles, __TLX__n_b, n_h, Sq, Sk, coff,
                     __FP8P____OPS_KARGS__0, BLOCK_M, BLOCK_N, HEAD_DV, STAGES, PINGPONG, OVERLAP, EMU, TREE, LATE, LSUM,
                     MID, JOIN, PERSISTENT, O_ALIAS, BLOCK_N2, PREFETCH)),
        (_consumer, (q2, k2, v2, kb2, vb2, o2, o_smem, ones_smem, q_bar, q_empty, k_full, v_full, k_empty, v_empty, turn,
                     o_desc, LSE, slb, slh, slm, off_b, off_h, m0, lo, n_tiles, __TLX__n_b, n_h, Sq, Sk, coff,
                     __FP8P____OPS_KARGS__1, BLOCK_M, BLOCK_N, HEAD_DV, STAGES, PINGPONG, OVERLAP, EMU, TREE, LATE, LSUM,
                     MID, JOIN, PERSISTENT, O_ALIAS, BLOCK_N2, PREFETCH)),
        (_producer, (q_desc, k_desc, v_desc, k2_desc, v2_desc, q_smem, k_smem, v_smem, k2_smem, v2_smem, q_bar, q_empty,
                     k_full, v_full, k_empty, v_empty, off_b, off_h, off_hk, m0, lo, n_tiles, __TLX__n_b, n_h, Sq, Sk,
                     coff, BLOCK_M, BLOCK_N, STAGES, PERSISTENT, BLOCK_N2)),
    ], [4, 1], [240, 24])
'''

_HEAD = '''import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)


@gluon.jit
def _tanh(x):
    t = gl.exp(-2.0 * gl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return gl.where(x < 0, -r, r)


@gluon.jit
def _sigmoid(x):
    return 1.0 / (1.0 + gl.exp(-x))

'''


def operand_text(spec: KernelSpec, indent: str) -> tuple[str, str, list[str]]:
    """Score operands in the generated Gluon text: the kernel's parameters (pointer and (b, h, m, n) strides),
    the score function's arguments, and the lines computing each operand's (batch, head) base pointer from
    off_b / off_h (broadcast dims skipped). Shared by the forward and backward Hopper kernels."""
    n = range(len(spec.operands))
    params = "".join(f"OP{i}, st{i}_b, st{i}_h, st{i}_m, st{i}_n, " for i in n)
    args = "".join(f"OP{i}b, st{i}_m, st{i}_n, " for i in n)
    bases = []
    for i, o in enumerate(spec.operands):
        ptr = f"OP{i}"
        if not o.bcast[0]:
            ptr += f" + off_b.to(gl.int64) * st{i}_b"
        if not o.bcast[1]:
            ptr += f" + off_h.to(gl.int64) * st{i}_h"
        bases.append(f"{indent}OP{i}b = {ptr}")
    return params, args, bases


def tile_plan(prog, kinds):
    """(operand, kind) of the mask operand the kernel visits through tile lists, or None. Only without a
    structural mask: a structural mask already bounds the key range, and mixing both is not worth the code.
    kinds: per operand 'bool' or 'float'."""
    if prog.causal != "none":
        return None
    return mask_tiles.plan(prog, kinds)


# FP8: rows per Q scale and per K / V scale (kernels/fp8_quant.py); a CTA's 2 x 64 query rows share one Q
# scale, a 64- or 128-key tile lies inside one K / V scale block; a larger key tile has one scale per tile
# (fp8_quant_blocks).
FP8_QUANT_BLOCKS = (128, 128)


FP8_P_LOG2 = int(math.log2(P_SCALE))      # P enters the PV product as e4m3(p · 2^FP8_P_LOG2)


def fp8_quant_blocks(block_n: int) -> tuple[int, int]:
    """(rows per Q scale, keys per K / V scale) of the FP8 kernel with key tiles of block_n."""
    return FP8_QUANT_BLOCKS[0], max(FP8_QUANT_BLOCKS[1], block_n)


class _HopperGen:
    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self.prog = spec.prog
        self.scale = self.prog.scale_only()
        self.nops = len(spec.operands)
        self.causal = self.prog.causal != "none"
        self.window = self.prog.window
        self.tiles = tile_plan(self.prog, [o.kind for o in spec.operands])
        self.fp8 = spec.dtype.startswith("float8")
        # a positive pure scale is applied inside the exp2's FFMA (x·qk - m), with the row max taken on the raw
        # scores; any other chain is evaluated in natural units first
        self.fold = self.scale is not None and self.scale > 0

    def score_fn(self, name: str, masked: bool, expr) -> list[str]:
        """x for one tile: the raw scores when the scale folds into the softmax, else the chain in natural units;
        operand loads are bounds-checked on rows always, on keys when masked."""
        em = Emitter(self.spec, "s", "qi", "kj", "(qi < Sq)", "(kj < Sk)" if masked else None, ns="gl")
        if self.fold:                   # raw scores: the softmax step multiplies by qk (every variant is s·scale)
            body = ["x = s"]
        else:
            root = em.emit(expr)
            body = em.lines + [f"x = {em.full_float(root)}"]
        params = "".join(f"OP{n}b, st{n}_m, st{n}_n, " for n in range(self.nops))
        return ["@gluon.jit", f"def {name}(s, qi, kj, Sq, Sk, {params}):"] + [_ind(body + ["return x"]), "", ""]

    def steps(self) -> tuple[str, str]:
        """The softmax-step calls of the prologue (tile 0, always masked) and of tile j: with tile lists, a
        neutral tile takes the operand-free variant (a runtime branch); without, there is no such branch."""
        # operand values of PREFETCH: the prologue's (OPP...) and the key loop's (OPV...), never the same names, so
        # the loop carries none of them
        opp = "".join(f"OPP{n}, " for n in range(self.nops))
        opv = "".join(f"OPV{n}, " for n in range(self.nops))
        call = ("{lhs} = _softmax_step(s, m_i, qk, qi, kj, Sq, Sk, coff, __OPS_ARGS__{opv}{masked}, {neutral}, EMU, "
                "TREE, SPLIT, PREFETCH)")
        p0, pj = "p_arg, m_i, alpha", "p_arg, m_new, alpha"
        call0 = call.replace("{opv}", opp).format
        call = call.replace("{opv}", opv)
        if self.tiles is None:
            step0 = "    " + call0(lhs=p0, masked="True", neutral="False")
            stepj = ("        if masked:\n            " + call.format(lhs=pj, masked="True", neutral="False")
                     + "\n        else:\n            " + call.format(lhs=pj, masked="False", neutral="False"))
            # key-split blocks: both parts in one step (tile lists are per BLOCK_N block: none here)
            call2 = ("{lhs} = _softmax_step2(s, s2, m_i, qk, qi, qi2, kj, kj2, Sq, Sk, coff, __OPS_ARGS__{masked}, "
                     "False)")
            kj2 = "kj2 = gl.expand_dims({start} + BLOCK_N + gl.arange(0, BLOCK_N2, col2_l), 0)"
            two0 = ["        " + kj2.format(start="_tile_start(0, lo, __TLA__NT)"),
                    "        " + call2.format(lhs="p_arg, p2, m_i, alpha", masked="True")]
            twoj = ["            " + kj2.format(start="start_n"),
                    "            if masked:",
                    "                " + call2.format(lhs="p_arg, p2, m_new, alpha", masked="True"),
                    "            else:",
                    "                " + call2.format(lhs="p_arg, p2, m_new, alpha", masked="False")]
            return (_split_or(step0, two0, "    "), _split_or(stepj, twoj, "        "))
        # tile lists are per BLOCK_N block: the launch side never pairs them with key-split blocks
        step0 = ("    gl.static_assert(BLOCK_N2 == 0, 'tile lists with key-split blocks')\n"
                 "    if _tile_neutral(0, __TLA__):\n        " + call0(lhs=p0, masked="True", neutral="True")
                 + "\n    else:\n        " + call0(lhs=p0, masked="True", neutral="False"))
        rows = []
        for neutral, head in (("True", "        if _tile_neutral(j, __TLA__):"), ("False", "        else:")):
            rows += [head, "            if masked:",
                     "                " + call.format(lhs=pj, masked="True", neutral=neutral),
                     "            else:",
                     "                " + call.format(lhs=pj, masked="False", neutral=neutral)]
        return step0, "\n".join(rows)

    def value_score_fns(self) -> list[str]:
        """PREFETCH: _vscore_masked / _vscore_full, the score chain on operand values loaded ahead (raw dtype; the
        fp32 conversion happens here, at use), and _ops_masked / _ops_full, the loads themselves: the same
        addresses and bounds predicates as the pointer variants, predicated off for neutral tiles (tile lists),
        which use no operand."""
        out = []
        names = [f"OPV{n}" for n in range(self.nops)]
        live = " & live" if self.tiles is not None else ""
        for masked in (True, False):
            suffix = "masked" if masked else "full"
            em = Emitter(self.spec, "s", "qi", "kj", None, None, ns="gl", op_value=lambda n: f"OPV{n}")
            if self.fold:
                body = ["x = s"]
            else:
                root = em.emit(self.prog.expr)
                body = em.lines + [f"x = {em.full_float(root)}"]
            out += ["@gluon.jit", f"def _vscore_{suffix}(s, qi, kj, Sq, Sk, {''.join(n + ', ' for n in names)}):",
                    _ind(body + ["return x"]), "", ""]
            em = Emitter(self.spec, "s", "qi", "kj", f"(qi < Sq){live}", "(kj < Sk)" if masked else None, ns="gl",
                         pred=live.removeprefix(" & ") or None)
            loads = [em.raw_load(n) for n in range(self.nops)]
            params = "".join(f"OP{n}b, st{n}_m, st{n}_n, " for n in range(self.nops))
            out += ["@gluon.jit", f"def _ops_{suffix}(qi, kj, Sq, Sk, live, {params}):",
                    _ind(em.lines + [f"return {', '.join(loads)}" if loads else "return 0"]), "", ""]
        return out

    def prefetch(self) -> tuple[str, str]:
        """PREFETCH's loads of the prologue's tile (always masked) and of key block j, issued before the block's K
        wait and S product so that their latency runs under the GEMMs instead of ahead of the softmax; without
        PREFETCH the names are placeholders the steps never read."""
        if not self.nops:
            return "", ""
        params = "".join(f"OP{n}b, st{n}_m, st{n}_n, " for n in range(self.nops))
        pp = ", ".join(f"OPP{n}" for n in range(self.nops))
        pv = ", ".join(f"OPV{n}" for n in range(self.nops))
        zero = lambda names: ", ".join("0" for _ in names.split(", "))  # noqa: E731
        live0 = "_tile_neutral(0, __TLA__) == False" if self.tiles is not None else "True"
        livej = "_tile_neutral(j, __TLA__) == False" if self.tiles is not None else "True"
        pro = ["    if PREFETCH:",
               "        pkj = gl.expand_dims(_tile_start(0, lo, __TLA__NT) + gl.arange(0, BLOCK_N, col_l), 0)",
               f"        {pp} = _ops_masked(qi, pkj, Sq, Sk, {live0}, {params})",
               "    else:",
               f"        {pp} = {zero(pp)}"]
        loop = ["        if PREFETCH:",
                "            pkj = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, col_l), 0)",
                "            if _tile_masked(start_n, row0, Sk, coff, BLOCK_M, NT):",
                f"                {pv} = _ops_masked(qi, pkj, Sq, Sk, {livej}, {params})",
                "            else:",
                f"                {pv} = _ops_full(qi, pkj, Sq, Sk, {livej}, {params})",
                "        else:",
                f"            {pv} = {zero(pv)}"]
        return "\n".join(pro) + "\n", "\n".join(loop) + "\n"

    def tile_fns(self) -> list[str]:
        """Which key blocks a CTA visits: a range, or the pre-pass's list (mask_tiles.py) with each tile's class."""
        if self.tiles is None:
            return ["@gluon.jit", "def _tile_start(j, lo, BLOCK_N: gl.constexpr):", "    return lo + j * BLOCK_N", "",
                    ""]
        return ["@gluon.jit", "def _tile_start(j, lo, TL_IDX, TL_CLS, tl_off, BLOCK_N: gl.constexpr):",
                "    return gl.load(TL_IDX + tl_off + j) * BLOCK_N", "", "",
                "@gluon.jit", "def _tile_neutral(j, TL_IDX, TL_CLS, tl_off):",
                f"    return gl.load(TL_CLS + tl_off + j) == {mask_tiles.NEUTRAL}", "", ""]

    def visible(self) -> str:
        if not self.causal:
            return "(kj < Sk)"
        # key bound and diagonal as one per-row limit: one compare per score, two registers per thread
        parts = ["(kj <= gl.minimum(qi + coff, Sk - 1))"]
        if self.window is not None:
            parts.append(f"(kj >= qi + coff - {self.window})")
        return _and(*parts)

    def tile_masked(self) -> str:
        lines = []
        if self.causal:
            lines.append("    masked = masked | (start_n + BLOCK_N > row0 + coff + 1)")
            if self.window is not None:
                lines.append(f"    masked = masked | (start_n < row0 + BLOCK_M - 1 + coff - {self.window})")
        return "".join(ln + "\n" for ln in lines)

    def kv_range(self) -> str:
        lines = []
        if self.causal:
            lines.append("    hi = gl.minimum(hi, gl.maximum(m0 + 2 * BLOCK_M + coff, 0))")
            if self.window is not None:
                lines.append(f"    lo = (gl.maximum(m0 + coff - {self.window}, 0) // BLOCK_N) * BLOCK_N")
        return "\n".join(lines)

    def module(self) -> str:
        spec = self.spec
        ops_params, ops_args, bases = operand_text(spec, "    ")
        if self.prog.empty_row == "nan":
            empty = "    out = gl.where(gl.expand_dims(gl.convert_layout(empty, orow_l), 1), float('nan'), out)"
        else:
            empty = ""
        causal_order = "        pid_m = gl.num_programs(0) - 1 - pid_m   # heavy tiles first" if self.causal else ""
        if self.causal:     # LPT: the heaviest query blocks of every (batch, head) first, then the next lighter
            work = ["    n_bh = n_h * n_b", "    pid_m = n_m - 1 - tile // n_bh", "    bh = tile % n_bh"]
        else:               # query blocks fastest, then heads: concurrent tiles share K / V in L2
            work = ["    pid_m = tile % n_m", "    bh = tile // n_m"]
        if self.tiles is None:
            tla, tlp, tl_ret, tl_zero = "", "", "", ""
            tlaw, tlw_ret = "", ""
            n_tiles = "    n_tiles = gl.cdiv(hi - lo, BLOCK_N)"
        else:
            tla = "TL_IDX, TL_CLS, tl_off, "
            tlp = "TL_IDX, TL_CLS, TL_CNT, tl_sb, tl_sh, tl_sm, tl_cb, tl_ch, "
            tl_ret, tl_zero = ", tl_off", "        tl_off = 0\n"
            tlaw, tlw_ret = "TL_IDX, TL_CLS, w_tl, ", ", w_tl"
            n_tiles = ("    tl_off = off_b.to(gl.int64) * tl_sb + off_h.to(gl.int64) * tl_sh + pid_m.to(gl.int64) * tl_sm\n"
                       "    n_tiles = gl.load(TL_CNT + off_b.to(gl.int64) * tl_cb + off_h.to(gl.int64) * tl_ch + pid_m)")
        ln2 = "0.6931471805599453"
        # FP8: P enters the e4m3 A operand as 256·p (P_LOG2 = 8 in the exponent, so small probabilities keep
        # their mantissa); l sums the same scaled p, and lse takes the 8 back out
        poff = FP8_P_LOG2 if self.fp8 else 0
        log2_l = f"(gl.log2(l_safe) - {poff!r}.0)" if poff else "gl.log2(l_safe)"
        m_shift = f"gl.expand_dims(m_use - {poff!r}.0, 1)" if poff else "gl.expand_dims(m_use, 1)"
        if self.fold:      # m in log2 units; p = exp2(FFMA(x, qk, -m))
            rowmax, p_exp, alpha_exp = "gl.max(x, 1) * qk", f"x * qk - {m_shift}", "m_i - m_use"
            lse = f"(m_i + {log2_l}) * {ln2}"
        else:              # m in natural units
            rowmax, alpha_exp = "gl.max(x, 1)", f"(m_i - m_use) * {LOG2E!r}"
            p_exp = f"(x - gl.expand_dims(m_use, 1)) * {LOG2E!r}" + (f" + {poff!r}.0" if poff else "")
            lse = f"m_i + {log2_l} * {ln2}"
        qk_const = f"    qk = {self.scale * LOG2E!r}\n" if self.fold else "    qk = 1.0\n"
        if self.fp8:
            qbn = FP8_QUANT_BLOCKS[1]
            fp8p = "QS, KS, VS, sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h, "
            # one Q scale per CTA (2 x BLOCK_M rows), one K / V scale per KVB keys; V's scale is folded
            # into the accumulator's rescale, so acc is always in units of the last V tile added. The K and V
            # scales of a tile are loaded before its barrier waits, so their latency hides under them.
            fp8_q = (f"    KVB: gl.constexpr = BLOCK_N if BLOCK_N > {qbn} else {qbn}   # keys per K / V scale\n"
                     f"    qsc = gl.load(QS + off_b.to(gl.int64) * sqs_b + off_h.to(gl.int64) * sqs_h + m0 // (2 * BLOCK_M))\n"
                     # 32-bit offsets from the (constant-bank) base pointers: one register each, not two
                     f"    ks_off = off_b * sks_b + (off_h // {spec.G}) * sks_h\n"
                     f"    vs_off = off_b * svs_b + (off_h // {spec.G}) * svs_h\n")
            fp8_load0 = ("    start0 = _tile_start(0, lo, __TLA__BLOCK_N)\n"
                         "    ks_j = gl.load(KS + ks_off + start0 // KVB)\n"
                         "    vs_prev = gl.load(VS + vs_off + start0 // KVB)\n")
            fp8_loadj = ("        ks_j = gl.load(KS + ks_off + start_n // KVB)\n"
                         "        vs_new = gl.load(VS + vs_off + start_n // KVB)\n")
            if self.fold:     # the descales join qk: one scalar multiply per tile
                fp8_q += f"    qk0 = qsc * {self.scale * LOG2E!r}\n"
                qk_const = ""
                fp8_s0, fp8_sj = "    qk = qk0 * ks_j\n", "        qk = qk0 * ks_j\n"
            else:
                fp8_s0, fp8_sj = "    s = s * (qsc * ks_j)\n", "        s = s * (qsc * ks_j)\n"
            alpha = "alpha * (vs_prev / vs_new)"
            p_cast = "_p_fp8(p, p_layout, BLOCK_M, BLOCK_N)"
            out_scale = "vs_prev"
            v_coord, v_tile, vt = "[off_b, off_hk, 0, start_n]", "[HEAD_DV, BLOCK_N]", ".permute((1, 0))"
        else:
            fp8p = fp8_q = fp8_s0 = fp8_sj = fp8_load0 = fp8_loadj = ""
            alpha, p_cast, out_scale = "alpha", "p.to(dtype)", "1.0"
            v_coord, v_tile, vt = "[off_b, off_hk, start_n, 0]", "[BLOCK_N, HEAD_DV]", ""
        # P as the PV operand (a layout change without data movement). FP8 converts right before the product:
        # carried across the loop edge as separate bytes, its 4-byte registers would be rebuilt byte by byte
        p_op = f"p_op = gl.convert_layout({p_cast}, p_layout, assert_trivial=True)\n"
        before, after = (p_op, "") if self.fp8 else ("", p_op)
        step0, stepj = self.steps()
        text = _KERNEL.replace("__STEP0__", step0).replace("__STEPJ__", stepj).replace("__PV_WAIT__", _PV_WAIT)
        pre0, prej = self.prefetch()
        text = (text.replace("__PREFETCH0__", pre0).replace("__PREFETCHJ__", prej)
                .replace("__OPV_PARAMS__", "".join(f"OPV{n}, " for n in range(self.nops)))
                .replace("__OPV_ZEROS__", "0, " * self.nops))
        if self.fold:
            rowmax_of = lambda x: f"gl.max({x}, 1) * qk"  # noqa: E731
            p_exp_of = lambda x, m: f"{x} * qk - gl.expand_dims({m}{f' - {poff!r}.0' if poff else ''}, 1)"  # noqa: E731
        else:
            rowmax_of = lambda x: f"gl.max({x}, 1)"  # noqa: E731
            p_exp_of = lambda x, m: (f"({x} - gl.expand_dims({m}, 1)) * {LOG2E!r}"  # noqa: E731
                                     + (f" + {poff!r}.0" if poff else ""))
        for token, value in [("__ROWMAX_X__", rowmax_of("x")), ("__ROWMAX_X2__", rowmax_of("x2")),
                             ("__P_EXP_X__", p_exp_of("x", "m_use")), ("__P_EXP_X2__", p_exp_of("x2", "m_use2"))]:
            text = text.replace(token, value)
        # LATE: FP8's P conversion also moves under S's GEMM (its fp32 P crosses the loop edge instead)
        top = f"        if not LATE:\n            {before}" if before else ""
        late = f"        if LATE:\n            {before}" if before else ""
        for token, value in [("__P_OP_PRO__", "    " + after), ("__P_OP_END__", "        " + after),
                             ("__P_OP_TOP__", top), ("__P_OP_LATE__", late), ("__P_OP_LAST__", "    " + before)]:
            text = text.replace(token, value if value.strip() else "")
        if self.fp8:
            text = text.replace("        m_i = m_new\n", "        m_i = m_new\n        vs_prev = vs_new\n")
        text = (text.replace("__FP8_Q__", fp8_q).replace("__FP8_S0__", fp8_s0).replace("__FP8_SJ__", fp8_sj)
                .replace("__FP8_LOAD0__", fp8_load0).replace("__FP8_LOADJ__", fp8_loadj).replace("__QK0__", qk_const)
                .replace("__ALPHA__", alpha).replace("__OUT_SCALE__", out_scale)
                .replace("__V_COORD__", v_coord).replace("__V_TILE__", v_tile).replace("__VT__", vt)
                .replace("__FP8P__", fp8p))
        for token, value in [("__ROWMAX__", rowmax), ("__ROWSCALE__", " * qk" if self.fold else ""),
                             ("__EXP2_MIX__", exp2_mix()), ("__P_EXP__", p_exp), ("__ALPHA_EXP__", alpha_exp), ("__LSE__", lse), ("__TLA__", tla), ("__TLP__", tlp), ("__N_TILES__", n_tiles),
            ("__TLX__", tlp + ("tl_off, " if tla else "")), ("__TLAW__", tlaw), ("__TLW_RET__", tlw_ret),
            ("__TL_RET__", tl_ret), ("__TL_ZERO__", tl_zero), ("__WORK_ORDER__", "\n".join(work)),
            ("__OPS_KPARAMS__", ops_params), ("__OPS_PARAMS__", ops_params), ("__OPS_KARGS__", ops_params),
            ("__OPS_ARGS__", ops_args), ("__OPS_BASES__", "\n".join(bases)), ("__VISIBLE__", self.visible()),
            ("__TILE_MASKED__", self.tile_masked()), ("__KV_RANGE__", self.kv_range()),
            ("__EMPTY_ROWS__", empty), ("__CAUSAL_ORDER__", causal_order), ("__G__", str(spec.G)),
        ]:
            text = text.replace(token, value)
        neutral = self.prog.expr if self.tiles is None else mask_tiles.neutral_program_expr(self.prog, *self.tiles)
        fns = (self.score_fn("_score_masked", True, self.prog.expr) + self.score_fn("_score_full", False, self.prog.expr)
               + self.score_fn("_score_neutral", False, neutral) + self.value_score_fns() + self.tile_fns())
        return _HEAD + "\n".join(fns) + text


def _split_or(one: str, two: list[str], indent: str) -> str:
    """A step's text for both block shapes: the key-split step (lines at indent + 4) when BLOCK_N2 > 0, else the
    one-part step (re-indented by 4)."""
    one = "\n".join(("    " + ln) if ln.strip() else ln for ln in one.split("\n"))
    return f"{indent}if BLOCK_N2 > 0:\n" + "\n".join(two) + f"\n{indent}else:\n" + one


def exp2_mix() -> str:
    """Body of _exp2_mix: one static branch per EMU (0: gl.exp2 alone)."""
    lines = ["    if EMU == 0:", "        y = gl.exp2(x)"]
    for e in range(1, fp8_exp2.PACK + 1):
        lines += [f"    elif EMU == {e}:",
                  f"        y = gl.inline_asm_elementwise({fp8_exp2.asm(e)!r}, {fp8_exp2.constraints()!r}, [x], "
                  f"dtype=gl.float32, is_pure=True, pack={fp8_exp2.PACK})"]
    return "\n".join(lines + ["    return y"])


def generate(spec: KernelSpec) -> str:
    return _HopperGen(spec).module()
