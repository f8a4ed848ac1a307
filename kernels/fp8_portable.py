"""FP8 (e4m3) attention forward in portable Triton: supports / forward for the dispatch table.

forward = one quantize pass per operand (kernels/fp8_quant.py: Q and K rotated by the recipe's Hadamard
matrix when it says so, tile scales per QBM query rows and per QBN key rows, V written transposed with the
sequence contiguous), then the generated attn_fwd in its FP8 variant (kernels/templates.py): the same score
program, structural masks, operands and grouped-query attention as the 16-bit kernel, with the per-tile
descales folded into the softmax scale, P in e4m3 with a fixed scale and V's scale folded into the
accumulator's rescale. Output in the input dtype, plus lse (fp32).

There is no FP8 backward: the op's backward of an FP8 forward runs the 16-bit backward on the original
q, k, v with this forward's out and lse (fa3_inductor/dispatch.py).
"""

from __future__ import annotations

import torch

from . import fp8_quant
from . import triton_portable as tp
from .fp8_recipe import Fp8Recipe, hadamard_dim
from .program import ScoreProgram
from .uniform_fill import uniform_fill

INPUT_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 9)             # e4m3 tensor-core dots: Ada (sm_89) and Hopper (sm_90) onwards

# Quantization blocks (rows per scale) for Q and for K/V; every kernel tile must divide them, so that a tile
# has exactly one scale of each operand.
QUANT_BLOCKS = (128, 128)
INTERPRET_QUANT_BLOCKS = (32, 32)

# Interpreter: small unequal tiles (BLOCK_N < QBN, so one K/V scale spans two key tiles).
INTERPRET_CONFIG = (32, 16, 4, 1)


def _fwd_configs(d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the default when tuning is not possible.
    Checked by compiling for sm_90 offline (ptxas -v): no spills at D <= 128; at D = 256 every tile tried
    spills, (64, 64, 8, 2) least (40 bytes)."""
    if d <= 64:
        return [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3)]
    if d <= 128:
        return [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 8, 3), (128, 32, 8, 3)]
    return [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)]


def supports(prog: ScoreProgram, q, k, v, operands, recipe: Fp8Recipe) -> str | None:
    if q.dtype not in INPUT_DTYPES:
        return f"FP8 takes fp16/bf16 inputs, not {str(q.dtype).replace('torch.', '')}"
    d, dv = q.shape[-1], v.shape[-1]
    dq = hadamard_dim(d) if recipe.hadamard else d
    if dq > MAX_HEAD_DIM:
        return f"head dim {d}" + (f" (rotated width {dq})" if dq != d else "") + f" > {MAX_HEAD_DIM}"
    if dv > MAX_HEAD_DIM:
        return f"value head dim {dv} > {MAX_HEAD_DIM}"
    if q.device.type == "cuda":
        cap = torch.cuda.get_device_capability(q.device)
        if cap < MIN_CAPABILITY:
            return f"GPU sm_{cap[0]}{cap[1]} has no FP8 tensor cores (needs sm_89 or newer)"
    return tp.supports(prog, q, k, v, operands, fp8=True)


def quant_blocks(device) -> tuple[int, int]:
    return INTERPRET_QUANT_BLOCKS if device.type == "cpu" else QUANT_BLOCKS


def forward(q, k, v, operands, prog: ScoreProgram, recipe: Fp8Recipe):
    """Returns (out (B, Hq, Sq, Dv) in v.dtype, lse fp32 (B, Hq, Sq))."""
    b, hq, sq, d = q.shape
    sk, dv = k.shape[2], v.shape[-1]
    dev = q.device
    out = tp.empty_out(b, hq, sq, dv, v.dtype, dev)
    lse = tp._empty((b, hq, sq), torch.float32, dev)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    qbm, qbn = quant_blocks(dev)
    q8, k8, v8 = fp8_quant.quantize_qkv(q, k, v, recipe, qbm, qbn, v_transposed=True)
    qr, kr, vr = q8.data, k8.data, v8.rows()
    spec, mod, op_args, coff, skey, hf = tp._prepare(qr, kr, vr, operands, prog)
    scales = [q8.scale, k8.scale, v8.scale]
    scale_strides = [st for t in scales for st in t.stride()]

    def launch(cfg):
        bm, bn, warps, stages = cfg
        if qbm % bm or qbn % bn:
            raise ValueError(f"fp8 tile ({bm}, {bn}) does not divide the quantization blocks ({qbm}, {qbn})")
        grid = tp._grid_m(hf, tp.triton_cdiv(sq, bm), hq, b)
        mod.attn_fwd[grid](qr, kr, vr, out, lse, *scales, *scale_strides, *op_args, *qr.stride(), *kr.stride(),
                           *vr.stride(), *out.stride(), *lse.stride(), sq, sk, coff, BLOCK_M=bm, BLOCK_N=bn,
                           QBM=qbm, QBN=qbn, num_warps=warps, num_stages=stages)

    tp._launch_tuned("fp8_fwd", tp._tune_key(skey, sq, sk), qr.shape[-1], q.dtype, dev, launch,
                     configs=_fwd_configs(qr.shape[-1], q.dtype), interpret_config=INTERPRET_CONFIG)
    if prog.empty_row == "uniform":     # the kernel leaves rows with no visible key at 0
        out = uniform_fill(out, lse, v)
    return out, lse
