"""Launch side of the split-KV decode kernels (templates_decode.py): supports / forward / backward.

For a few queries (Sq <= 16: one generated token, or a short speculative run) against a long KV cache, the
general kernel would start one program per query head with BLOCK_M mostly padding and read every K/V tile
once per query head of a group. Here the programs are (split of the key axis, kv head, batch): enough of them
to fill the GPU even at batch 1, each reading its K/V tiles once for all G query heads of its group; a
combine kernel merges the splits' partial (out, lse). The backward is the general one (triton_portable).
"""

from __future__ import annotations

import functools

import torch

from . import launcher
from . import triton_portable as tp
from .program import ScoreProgram

MAX_QUERIES = 16     # more queries per head: a prefill shape, served by the general kernel
MAX_ROWS = 128       # G·Sq rows of one program (its BLOCK_M)
MAX_SPLITS = 128     # the combine kernel loads every split of a row at once
QUANTUM = 128        # a split's length is a multiple of this, hence of every CUDA BLOCK_N below
CTAS_PER_SM = 2      # CUDA: split until about this many programs per multiprocessor are running

# (BLOCK_N, num_warps, num_stages) for a program of block_m rows; the first is the default when tuning is not
# possible. Not yet timed on a GPU; every entry was compiled offline for sm_90 (unit strides specialised as at
# launch) without register spills and within 227 KB of shared memory. fp32 (IEEE FMA dot) needs small tiles.
def _configs(d: int, dtype: torch.dtype, block_m: int):
    if dtype == torch.float32:
        return [(32, 8, 2), (64, 4, 2), (16, 8, 2)] if block_m <= 16 else [(16, 8, 2)]
    if d <= 128:
        if block_m <= 32:
            return [(64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 4)]
        return [(64, 8, 3), (32, 8, 4), (64, 8, 2)]
    if block_m <= 32:
        return [(64, 4, 2), (32, 4, 3), (64, 8, 3), (32, 8, 4)]
    return [(64, 8, 2), (32, 8, 3), (32, 8, 4)]


# Interpreter: a small BLOCK_N, so short test sequences still have several blocks per split. Tests may change
# it; a split's length is a multiple of its BLOCK_N there.
INTERPRET_CONFIG = (16, 4, 1)
INTERPRET_SPLITS = 3   # default split count in the interpreter (the combine path is the one worth running)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def supports(prog: ScoreProgram, q, k, v, operands) -> str | None:
    reason = tp.supports(prog, q, k, v, operands)
    if reason:
        return reason
    b, hq, sq, _ = q.shape
    hk = k.shape[1]
    if not tp._ints(b, hq, sq, hk):
        return "symbolic batch, heads or query length (the decode kernel is chosen on concrete sizes)"
    if sq > MAX_QUERIES:
        return f"{sq} queries per head is not a decode shape (at most {MAX_QUERIES})"
    if b * hq * sq == 0:
        return "no query rows"
    g = hq // hk
    if g * sq > MAX_ROWS:
        return f"{g} query heads per kv head x {sq} queries = {g * sq} rows > {MAX_ROWS} per program"
    return None


def split_cap(b: int, hk: int, device, splits: int | None = None) -> int:
    """The most splits a cache of any length gets: on CUDA enough programs to fill the device."""
    if splits is None:
        if device.type == "cuda":
            target = CTAS_PER_SM * _sm_count(device.index if device.index is not None else
                                             torch.cuda.current_device())
            splits = -(-target // max(1, b * hk))
        else:
            splits = INTERPRET_SPLITS
    return max(1, min(splits, MAX_SPLITS))


def split_plan(b: int, hk: int, sk: int, device, splits: int | None = None) -> tuple[int, int]:
    """(number of splits, keys per split). splits=None picks: on CUDA enough programs to fill the device."""
    quantum = INTERPRET_CONFIG[0] if device.type != "cuda" else QUANTUM
    blocks = max(1, -(-sk // quantum))
    splits = min(split_cap(b, hk, device, splits), blocks)
    chunk = -(-blocks // splits) * quantum
    return max(1, -(-sk // chunk)), chunk


def forward(q, k, v, operands, prog: ScoreProgram, splits: int | None = None):
    """Returns (out (B, Hq, Sq, Dv) in v.dtype, lse fp32 (B, Hq, Sq)); splits overrides the split count."""
    b, hq, sq, d = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = tp._empty((b, hq, sq, dv), v.dtype, q.device)
    lse = tp._empty((b, hq, sq), torch.float32, q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    spec, mod, op_args, coff, skey, _ = tp._prepare(q, k, v, operands, prog, "decode")
    block_m = max(16, _next_pow2(spec.G * sq))
    cap = split_cap(b, hk, q.device, splits)
    n_split, chunk = split_plan(b, hk, sk, q.device, cap)
    final = n_split == 1
    if final:   # written straight into out / lse: the partial buffers are not touched
        part, lpart = out, lse
    else:
        part = tp._empty((b, hq, sq, n_split, dv), torch.float32, q.device)
        lpart = tp._empty((b, hq, sq, n_split), torch.float32, q.device)

    # everything the launches are specialised on follows from q, k, v, the operands and the split
    base = ("decode", prog, q.device.index, launcher.call_key((q, k, v, *operands)), n_split, chunk)

    def launch(cfg):
        kernel, grid, args, kwargs = launch_args(q, k, v, operands, prog, out, lse, part, lpart, n_split, chunk,
                                                 cfg, prepared=(spec, mod, op_args, coff))
        launcher.launch(base + (cfg,), kernel, grid, args, kwargs)

    key = (skey, block_m, tp._bucket(sk), n_split)
    tp._launch_tuned("decode", key, d, q.dtype, q.device, launch, configs=_configs(d, q.dtype, block_m),
                     interpret_config=INTERPRET_CONFIG)
    if not final:
        launcher.launch(base + ("combine",), mod.attn_decode_combine, (sq, hq, b),
                        (part, lpart, out, lse, *part.stride(), *lpart.stride(), *out.stride(), *lse.stride(), n_split),
                        # sized by the cap, not this length's split count: a growing cache keeps one variant
                        dict(BLOCK_S=max(2, _next_pow2(cap))))
    return out, lse


def launch_args(q, k, v, operands, prog, out, lse, part, lpart, n_split: int, chunk: int, cfg, prepared=None):
    """(kernel, grid, args, kwargs) of one attn_decode launch with cfg = (BLOCK_N, warps, stages); part / lpart are
    the partial buffers, or out / lse themselves when n_split == 1 (the FINAL variant writes those directly)."""
    spec, mod, op_args, coff = prepared or tp._prepare(q, k, v, operands, prog, "decode")[:4]
    b, hq, sq, _ = q.shape
    hk, sk = k.shape[1], k.shape[2]
    final = n_split == 1
    pstrides = [0] * 5 if final else list(part.stride())
    lstrides = [0] * 4 if final else list(lpart.stride())
    bn, warps, stages = cfg
    args = (q, k, v, out, lse, part, lpart, *op_args, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *lse.stride(), *pstrides, *lstrides, sq, sk, coff, chunk)
    kwargs = dict(BLOCK_M=max(16, _next_pow2(spec.G * sq)), BLOCK_N=bn, FINAL=final, num_warps=warps,
                  num_stages=stages)
    return mod.attn_decode, (n_split, hk, b), args, kwargs


backward = tp.backward
