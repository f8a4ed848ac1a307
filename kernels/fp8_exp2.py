"""exp2 split between the MUFU unit and the FMA pipe, for the Hopper FP8 forward's softmax.

At head dim 128 an FP8 key tile costs each consumer warp 64 MUFU.EX2 (8 cycles each: the SM's 16 exp2 per
clock) next to a ~512-cycle GEMM of the other warpgroup, so one warpgroup's softmax cannot hide under the
other's GEMMs (ping-pong) while the exps issue back to back. Part of the exps can run on the FMA pipe instead:

    x  = max(x, -127)                 (2^-127 and below: 0, see below)
    t  = x + 1.5·2^23 rounded down    (floor(x) in the low mantissa bits of t; one FADD.RM)
    f  = x - (t - 1.5·2^23)           (the fraction, in [0, 1); exact)
    p  = 1 + f·(C1 + f·(C2 + f·C3))   (minimax for 2^f on [0, 1) with p(0) = 1; relative error 8.6e-5)
    2^x = bits(p) + (bits(t) << 23)   (floor(x) added to p's exponent; t's low 9 bits are floor(x) mod 512)

Eight instructions (FMNMX, 3 FADD, 3 FFMA, one shift-add) against one MUFU: worth it only for a fraction of
the scores. Masked scores (-inf) clamp to -127, whose fraction is 0 and p = 1 exactly, so the sum of exponent
bits is 0: +0.0, never NaN. Between -127 and -126 the result is p's mantissa read as a subnormal: in
[0, 2^-126] and monotone, not 2^x, but e4m3(256·p) and the row sum cannot tell either from 0. P is quantized to e4m3 (3 mantissa bits) after, so 8.6e-5 is invisible.

`asm(emulated)` is the PTX of one `gl.inline_asm_elementwise` call over 8 consecutive registers of a thread
(pack=8), the first `emulated` of them by the polynomial, the rest by ex2.approx.ftz; which scores of a tile
take which path does not matter (every score is independent). `reference` is the same arithmetic in torch.
"""

from __future__ import annotations

import struct

import torch

PACK = 8                                       # scores per inline-asm call; the emulated share is in PACK-ths
C1, C2, C3 = 0.6951172947883606, 0.22764353454113007, 0.077068030834198   # fp32-exact (see test_fp8_exp2)
MAX_REL_ERR = 8.6e-5                           # max |p / 2^x - 1| for x >= -126 (fp32 arithmetic included)
CLAMP = -127.0
MAGIC = 12582912.0                             # 1.5·2^23: the integer part of x lands in t's low bits


def _hex(v: float) -> str:
    return "0f" + struct.pack(">f", v).hex().upper()


def _poly(i: int, out: str, inp: str) -> str:
    x, t, f, p, e, b = (f"{n}{i}" for n in "xtfpeb")
    return (f"max.ftz.f32 {x}, {inp}, {_hex(CLAMP)}; add.rm.ftz.f32 {t}, {x}, {_hex(MAGIC)}; "
            f"sub.ftz.f32 {f}, {t}, {_hex(MAGIC)}; sub.ftz.f32 {f}, {x}, {f}; "
            f"fma.rn.ftz.f32 {p}, {f}, {_hex(C3)}, {_hex(C2)}; fma.rn.ftz.f32 {p}, {p}, {f}, {_hex(C1)}; "
            f"fma.rn.ftz.f32 {p}, {p}, {f}, {_hex(1.0)}; "
            f"mov.b32 {e}, {t}; shl.b32 {e}, {e}, 23; mov.b32 {b}, {p}; add.s32 {out}, {e}, {b}; ")


def asm(emulated: int) -> str:
    """PTX for PACK scores: $0..$7 = 2^($8..$15), the first `emulated` by the polynomial."""
    if not 0 < emulated <= PACK:
        raise ValueError(f"emulated exp2 per {PACK} scores must be in 1..{PACK}, got {emulated}")
    regs = "".join(f".reg .f32 x{i}, t{i}, f{i}, p{i}; .reg .b32 e{i}, b{i}; " for i in range(emulated))
    body = "".join(_poly(i, f"${i}", f"${i + PACK}") if i < emulated else f"ex2.approx.ftz.f32 ${i}, ${i + PACK}; "
                   for i in range(PACK))
    return "{ " + regs + body + "}"


def constraints() -> str:
    return ",".join(["=r"] * PACK + ["r"] * PACK)


def reference(x: torch.Tensor) -> torch.Tensor:
    """The polynomial path in torch float32 (fma as a rounded multiply-add: within 1 ulp of the kernel's)."""
    x = torch.clamp_min(x.float(), CLAMP)
    t = torch.floor(x)
    f = x - t
    p = 1.0 + f * (C1 + f * (C2 + f * C3))
    return (p.view(torch.int32) + (t.to(torch.int32) << 23)).view(torch.float32)
