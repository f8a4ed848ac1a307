"""Triton side of FP8 quantization: the fused quantize pass, the in-register Walsh–Hadamard transform, and the
fp32 -> e4m3 conversion the generated FP8 attention kernels also call.

Imported lazily (it imports triton): TRITON_INTERPRET must be set before triton is first imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_BLOCK = tl.constexpr(0)     # one scale per tile: amax, scale, quantize, store
MODE_AMAX = tl.constexpr(1)      # tensor scaling, first pass: store each tile's amax only
MODE_TENSOR = tl.constexpr(2)    # tensor scaling, second pass: quantize with the scale of the global amax


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """fp32 -> float8e4nv, round to nearest even (x already within ±448).

    EXACT rounds on the e4m3 grid in fp32 first, so the conversion itself is exact: Triton 3.6's CPU
    interpreter truncates and loses the carry into the exponent (125.7 -> 64). Hardware converts right."""
    if EXACT:
        bits = x.to(tl.int32, bitcast=True)
        e = tl.maximum((bits >> 23) & 0xFF, 127 - 6)            # e4m3 subnormals share 2^-6's spacing
        ulp = ((e - 3) << 23).to(tl.float32, bitcast=True)      # 3 mantissa bits
        y = x / ulp                                             # exact: a power of two, |y| < 16
        y = (y + 12582912.0) - 12582912.0                       # 1.5·2^23: fp32 add rounds to an integer, RNE
        x = y * ulp
    return x.to(tl.float8e4nv)


@triton.jit
def fwht_rows(x, ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """x [ROWS, N] fp32 -> x @ H_N (Sylvester order, not normalised): log2(N) butterfly stages in registers.

    Stage h pairs columns c and c + h (bit h of c clear): viewing a row as [N / 2h, 2, h], the pair is the
    middle axis, moved last so that split/join can take and rebuild it: (a, b) -> (a + b, a - b)."""
    for i in tl.static_range(LOG_N):          # h = 2^i
        y = tl.permute(tl.reshape(x, [ROWS, N >> (i + 1), 2, 1 << i]), [0, 1, 3, 2])
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
        x = tl.reshape(y, [ROWS, N])
    return x


@triton.jit
def _load_rotated(X, SIGNS, rows, cols, sxs, sxd, S, D, rsqrt_n, BD: tl.constexpr, LOG_BD: tl.constexpr,
                  CHUNK: tl.constexpr, ROTATE: tl.constexpr):
    x = tl.load(X + rows[:, None] * sxs + cols[None, :] * sxd, mask=(rows[:, None] < S) & (cols[None, :] < D),
                other=0.0).to(tl.float32)
    if ROTATE:
        x = x * tl.load(SIGNS + cols)[None, :]
        x = fwht_rows(x, CHUNK, BD, LOG_BD) * rsqrt_n
    return x


@triton.jit
def wgmma_key_position(r):
    """Position of key r in wgmma_key_order: 16g + 8a + 2t + b -> 16g + 4t + 2a + b."""
    return (r & ~15) | (((r >> 1) & 3) << 2) | (((r >> 3) & 1) << 1) | (r & 1)


@triton.jit
def _store_e4m3(Y, x, inv, rows, cols, sys, syd, S_STORE, D_STORE, EXACT: tl.constexpr, WGMMA_KEYS: tl.constexpr):
    y = to_e4m3(tl.clamp(x * inv, -448.0, 448.0), EXACT)
    if WGMMA_KEYS:
        rows = wgmma_key_position(rows)
    tl.store(Y + rows[:, None] * sys + cols[None, :] * syd, y,
             mask=(rows[:, None] < S_STORE) & (cols[None, :] < D_STORE))


@triton.jit
def _scale_of(amax):
    """(scale, 1/scale) for a tile amax: x ≈ e4m3(x / scale) * scale; an all-zero tile gets scale 1."""
    safe = tl.where(amax > 0.0, amax, 448.0)
    return tl.math.div_rn(safe, 448.0), tl.math.div_rn(448.0, safe)


@triton.jit(do_not_specialize=["S", "S_STORE"])
def quantize_kernel(X, Y, SC, SIGNS, GAMAX, sxb, sxh, sxs, sxd, syb, syh, sys, syd, scb, sch, scn,
                    S, S_STORE, D, D_STORE, rsqrt_n,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr, BD: tl.constexpr, LOG_BD: tl.constexpr,
                    ROTATE: tl.constexpr, MODE: tl.constexpr, EXACT: tl.constexpr, WGMMA_KEYS: tl.constexpr):
    """One program per (row tile of BLOCK rows, head, batch).

    MODE_BLOCK with CHUNK == BLOCK: load the tile once, rotate (sign flip, FWHT, 1/sqrt(n)), take its amax,
    scale, convert, store. With CHUNK < BLOCK (wide heads: only CHUNK x BD fp32 values stay live) pass 1
    walks the tile for its amax and pass 2 re-reads it (from L2) and rotates again before storing.
    MODE_AMAX / MODE_TENSOR are the two passes of tensor scaling (the global amax is reduced in between).
    Rows in [S, S_STORE) and columns in [D, D_STORE) are padding and get zeros; Y's strides choose the
    layout (rows, or transposed with the sequence contiguous; WGMMA_KEYS: keys stored at wgmma_key_position,
    chunks of a multiple of 16 rows). Scales are stored for tiles starting < S."""
    blk = tl.program_id(0)
    b64 = tl.program_id(2).to(tl.int64)
    h64 = tl.program_id(1).to(tl.int64)
    X += b64 * sxb + h64 * sxh
    Y += b64 * syb + h64 * syh
    SC += b64 * scb + h64 * sch + blk * scn
    cols = tl.arange(0, BD)
    r0 = blk * BLOCK
    tile_in = r0 < S
    if MODE == MODE_BLOCK and CHUNK == BLOCK:
        rows = r0 + tl.arange(0, BLOCK)
        x = _load_rotated(X, SIGNS, rows, cols, sxs, sxd, S, D, rsqrt_n, BD, LOG_BD, CHUNK, ROTATE)
        scale, inv = _scale_of(tl.max(tl.max(tl.abs(x), 1), 0))
        tl.store(SC, scale, mask=tile_in)
        _store_e4m3(Y, x, inv, rows, cols, sys, syd, S_STORE, D_STORE, EXACT, WGMMA_KEYS)
    else:
        if MODE == MODE_TENSOR:
            amax = tl.load(GAMAX)
        else:
            amax = tl.zeros([CHUNK], tl.float32)
            for c in range(0, BLOCK, CHUNK):
                rows = r0 + c + tl.arange(0, CHUNK)
                x = _load_rotated(X, SIGNS, rows, cols, sxs, sxd, S, D, rsqrt_n, BD, LOG_BD, CHUNK, ROTATE)
                amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
            amax = tl.max(amax, 0)
        if MODE == MODE_AMAX:
            tl.store(SC, amax, mask=tile_in)
        else:
            scale, inv = _scale_of(amax)
            tl.store(SC, scale, mask=tile_in)
            for c in range(0, BLOCK, CHUNK):
                rows = r0 + c + tl.arange(0, CHUNK)
                x = _load_rotated(X, SIGNS, rows, cols, sxs, sxd, S, D, rsqrt_n, BD, LOG_BD, CHUNK, ROTATE)
                _store_e4m3(Y, x, inv, rows, cols, sys, syd, S_STORE, D_STORE, EXACT, WGMMA_KEYS)


@triton.jit
def wgmma_key_order(y, BLOCK: tl.constexpr, BD: tl.constexpr):
    """Rows of y [BLOCK, BD] reordered in groups of 16: row 16g + 4t + 2a + b takes row 16g + 8a + 2t + b — the
    key order in which the Hopper FP8 kernel's P·V operand holds P's keys (fp8_quant.wgmma_key_order)."""
    return tl.reshape(tl.permute(tl.reshape(y, [BLOCK // 16, 2, 4, 2, BD]), [0, 2, 1, 3, 4]), [BLOCK, BD])


@triton.jit
def _load_tile(X, rows, cols, sxs, sxd, S, D):
    return tl.load(X + rows[:, None] * sxs + cols[None, :] * sxd, mask=(rows[:, None] < S) & (cols[None, :] < D),
                   other=0.0)


@triton.jit
def _store_tile(Y, y, inv, rows, cols, sys, syd, S_STORE, D_STORE, BLOCK: tl.constexpr, W: tl.constexpr,
                EXACT: tl.constexpr, WGMMA_KEYS: tl.constexpr):
    y = to_e4m3(tl.clamp(y * inv, -448.0, 448.0), EXACT)
    if WGMMA_KEYS:
        y = wgmma_key_order(y, BLOCK, W)
    tl.store(Y + rows[:, None] * sys + cols[None, :] * syd, y,
             mask=(rows[:, None] < S_STORE) & (cols[None, :] < D_STORE))


# S_STORE is specialised: a multiple of 16 (the transposed layout's) lets the sequence-contiguous store vectorise
@triton.jit(do_not_specialize=["S"])
def quantize_tile_kernel(X, Y, SC, R, sxb, sxh, sxs, sxd, syb, syh, sys, syd, scb, sch, scn, S, S_STORE, D, D_STORE,
                         rsqrt_n, BLOCK: tl.constexpr, BD: tl.constexpr, ROTATE: tl.constexpr,
                         EXACT: tl.constexpr, WGMMA_KEYS: tl.constexpr, TILES: tl.constexpr = 1,
                         STAGES: tl.constexpr = 1):
    """Block scaling of 16-bit inputs in one read and one write: one program per (TILES consecutive tiles of
    BLOCK rows, head, batch).

    Loads the tile in its own dtype; ROTATE multiplies it by R = diag(signs)·H_n on the tensor cores (R is ±1,
    exact in the input dtype; products exact, fp32 sums — the butterflies' sums in another order) and by
    1/sqrt(n); a 256-wide row is rotated as H_256 = H_2 ⊗ H_128: u = x[:, :128]·R[:128, :128],
    w = x[:, 128:]·R[128:, :128], rotated = [u + w, u - w]. Then the tile's amax, its scale, e4m3, one store
    (Y's strides choose rows or transposed; WGMMA_KEYS stores each 16 rows in wgmma_key_order). The 256-wide
    tile is held as two 128-wide halves. With TILES > 1 the program walks its tiles in a loop software-pipelined
    STAGES deep (the next tiles' loads in flight while one is rotated and stored: a one-tile program leaves the
    memory idle during its compute), and loads R once."""
    b64 = tl.program_id(2).to(tl.int64)
    h64 = tl.program_id(1).to(tl.int64)
    X += b64 * sxb + h64 * sxh
    Y += b64 * syb + h64 * syh
    W: tl.constexpr = BD if BD <= 128 else 128
    cols = tl.arange(0, W)
    if ROTATE:
        rr = tl.arange(0, W)[:, None] * BD + cols[None, :]
        r0 = tl.load(R + rr)
        if BD > 128:
            r1 = tl.load(R + 128 * BD + rr)
    for t in tl.range(0, TILES, num_stages=STAGES):
        blk = tl.program_id(0) * TILES + t
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        x0 = _load_tile(X, rows, cols, sxs, sxd, S, D)
        if BD > 128:
            x1 = _load_tile(X, rows, cols + 128, sxs, sxd, S, D)
        if ROTATE:
            u = tl.dot(x0, r0)
            if BD > 128:
                w = tl.dot(x1, r1)
                y0 = (u + w) * rsqrt_n
                y1 = (u - w) * rsqrt_n
            else:
                y0 = u * rsqrt_n
        else:
            y0 = x0.to(tl.float32)
            if BD > 128:
                y1 = x1.to(tl.float32)
        amax = tl.max(tl.max(tl.abs(y0), 1), 0)
        if BD > 128:
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(y1), 1), 0))
        scale, inv = _scale_of(amax)
        tl.store(SC + b64 * scb + h64 * sch + blk * scn, scale, mask=blk * BLOCK < S)
        _store_tile(Y, y0, inv, rows, cols, sys, syd, S_STORE, D_STORE, BLOCK, W, EXACT, WGMMA_KEYS)
        if BD > 128:
            _store_tile(Y, y1, inv, rows, cols + 128, sys, syd, S_STORE, D_STORE, BLOCK, W, EXACT, WGMMA_KEYS)
