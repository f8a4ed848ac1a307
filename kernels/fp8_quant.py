"""FP8 (e4m3) quantization of attention operands: one fused Triton pass per operand.

Each pass reads a 16/32-bit (B, H, S, D) tensor of any strides once, optionally rotates every row by the
recipe's random-sign Hadamard matrix (kernels/fp8_recipe.py; Q and K only, in registers, O(d log d)),
takes one amax per tile of `block` rows (block scaling) or per tensor (tensor scaling: a second pass after a
tiny reduction of the tiles' amax), and writes e4m3 plus fp32 scales. Conventions, for the kernels that
consume them (kernels/fp8_portable.py, the Hopper FP8 kernel):

    x[b, h, s, :] ≈ float(data[b, h, s, :]) * scale[b, h, s // block]    (rotated x for rotated operands)
    scale = amax / 448 (1.0 for an all-zero tile); values are clamped to ±448 and rounded to nearest even.

Layouts. Rows: data (B, H, S, Dq), last dim contiguous, row stride a multiple of 16 elements (TMA-ready).
Transposed (`transposed=True`, meant for V): data (B, H, Dv, S) with S contiguous and the row stride
rounded up to 16 — the k-major B operand of the FP8 P·V wgmma; padding columns are zeros. With
`wgmma_keys=True` (the Hopper FP8 kernel's V) each group of 16 keys is stored in `wgmma_key_order` and data
spans all round16(S) columns (a key < S may sit in a padding column). `Fp8Operand.rows()` gives the
(B, H, S, D) tensor of any layout (a view, or a gathered copy for wgmma_keys). Dq = hadamard_dim(D) for
rotated operands, else D.

Kernels: block scaling of 16-bit inputs on a GPU takes `quantize_tile_kernel` (one read, one write; the
rotation on the tensor cores); tensor scaling, fp32 inputs and the CPU interpreter take `quantize_kernel`
(the rotation as in-register butterflies, bit for bit kernels/fp8_reference.py).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from .fp8_recipe import Fp8Recipe, hadamard_dim, signed_hadamard, signs

FP8 = torch.float8_e4m3fn
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# fp32 values one program keeps live per chunk, and its warps: compiled for sm_90 offline (ptxas -v), a whole
# 128 x 128 tile at 16 warps and 32 x 256 chunks at 8 warps run without spills; 64 x 256 spills.
_LIVE_VALUES = {128: 16384, 256: 8192}


def _tile_warps(block: int, bd: int) -> int:
    """quantize_tile_kernel's warps: one per 2048 values of the tile, 4..16 (compiled for sm_90 offline, no
    spills: 128 x 128 at 8 warps 110 registers, 128 x 256 and 256 x 128 at 16 warps 111-127)."""
    return max(4, min(16, block * bd // 2048))


def _tile_pipeline(bd: int, rotate: bool, transposed: bool) -> tuple[int, int]:
    """(TILES, STAGES) of quantize_tile_kernel: tiles per program and the depth of its software pipeline (the
    next tile's loads as cp.async into shared memory while one is rotated and stored). (1, 1) is one tile per
    program; bench/fp8_variants.py times (4, 2) and (8, 2): sm_90a, 8 warps, D=128, no spills, Q/K 116 registers
    and 112 KiB shared (2 programs per SM), V 128 registers (from 64). Measured on the H100 (D=128, S=4k and 16k,
    bench/results/fp8_variants.md): rotated Q / K at (8, 2) 2170-2180 GB/s vs 1690-1710 at (1, 1); the transposed
    V is fastest at (1, 1) (2480-2580 GB/s vs 1690 at (8, 2)). D=256 keeps (1, 1): 4 tiles of it need 208 KiB."""
    if rotate and not transposed and bd <= 128:
        return 8, 2
    return 1, 1


@dataclasses.dataclass(frozen=True)
class Fp8Operand:
    data: torch.Tensor      # float8_e4m3fn, (B, H, S, Dq) or, transposed, (B, H, Dv, S)
    scale: torch.Tensor     # fp32 (B, H, ceil(S / block)); tensor scaling repeats one value
    block: int              # rows per scale
    transposed: bool
    rotated: bool
    wgmma_keys: bool = False    # transposed, keys of each 16 in wgmma_key_order, data (B, H, Dv, round16(S))
    seq_len: int | None = None  # S, when data spans more columns (wgmma_keys)

    def rows(self) -> torch.Tensor:
        """(B, H, S, D) tensor of data, whatever its layout (a copy for wgmma_keys)."""
        if not self.transposed:
            return self.data
        if not self.wgmma_keys:
            return self.data.transpose(-1, -2)
        pos = torch.argsort(wgmma_key_order(self.data.shape[-1], self.data.device))[: self.seq_len]
        return self.data.transpose(-1, -2)[..., pos, :]


def wgmma_key_order(n: int, device="cpu") -> torch.Tensor:
    """Key stored at each of n (a multiple of 16) positions: position 16g + 4t + 2a + b holds key
    16g + 8a + 2t + b — in each group of 16 keys, the 4 keys a thread t of the FP8 wgmma's A operand holds in
    one register are the ones its accumulator holds, so P needs no data movement (kernels/templates_hopper.py)."""
    p = torch.arange(n, device=device)
    g, t, a, b = p // 16, (p // 4) % 4, (p // 2) % 2, p % 2
    return 16 * g + 8 * a + 2 * t + b


def _empty(shape, dtype, device):
    """Every output buffer comes from here (tests replace it with a NaN-poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def _chunk(block: int, bd: int, interpret: bool) -> int:
    """Rows per register chunk: the largest power of two dividing block, within the live-value budget."""
    c = block & -block
    if not interpret:
        while c > 16 and c * bd > _LIVE_VALUES.get(bd, 16384):
            c //= 2
    return c


def check_quantizable(x: torch.Tensor, block: int, rotate: bool) -> str | None:
    """Reason x cannot be quantized by quantize(), or None."""
    if x.dim() != 4:
        return f"expected a 4-D (B, H, S, D) tensor, got {tuple(x.shape)}"
    if x.dtype not in INPUT_DTYPES:
        return f"dtype {x.dtype} is not fp16/bf16/fp32"
    d = x.shape[-1]
    if (hadamard_dim(d) if rotate else d) > MAX_HEAD_DIM:
        return f"head dim {d}{' (rotated width ' + str(hadamard_dim(d)) + ')' if rotate else ''} > {MAX_HEAD_DIM}"
    if not isinstance(block, int) or block <= 0:
        return f"block must be a positive int, got {block!r}"
    if block & (block - 1) and block % 16:
        return f"block {block} is neither a power of two nor a multiple of 16"
    if x.device.type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


def _tile_kernel_fits(x, block: int, bd: int, scaling: str, rotate: bool) -> bool:
    """Whether quantize_tile_kernel serves this call (see the module doc)."""
    return (scaling == "block" and block & (block - 1) == 0 and 16 <= block <= 256 and block * bd <= 32768
            and (not rotate or x.dtype in (torch.float16, torch.bfloat16)))


def quantize(x: torch.Tensor, *, block: int, rotate: bool = False, seed: int = 0, scaling: str = "block",
             transposed: bool = False, wgmma_keys: bool = False, tile_kernel: bool | None = None) -> Fp8Operand:
    """Quantize x (B, H, S, D) to e4m3 with one scale per `block` rows (or per tensor); see the module doc.
    tile_kernel: force (True) or refuse (False) quantize_tile_kernel; None picks it wherever it serves on a GPU."""
    reason = check_quantizable(x, block, rotate)
    if reason:
        raise ValueError(f"fp8 quantize: {reason}")
    if scaling not in ("block", "tensor"):
        raise ValueError(f"fp8 quantize: scaling {scaling!r} is not 'block' or 'tensor'")
    if wgmma_keys and not transposed:
        raise ValueError("fp8 quantize: wgmma_keys orders the keys of the transposed layout only")
    b, h, s, d = x.shape
    bd = hadamard_dim(d)                      # register width: a power of two >= d
    dq = bd if rotate else d
    dev = x.device
    interpret = dev.type == "cpu"
    fits = _tile_kernel_fits(x, block, bd, scaling, rotate)
    if tile_kernel and not fits:
        raise ValueError("fp8 quantize: the tile kernel takes block scaling, power-of-two blocks of 16..256 rows "
                         "(at most 32768 values a tile) and 16-bit inputs when rotating")
    use_tile = fits and (not interpret if tile_kernel is None else tile_kernel)
    if wgmma_keys and not use_tile and block % 16:
        raise ValueError(f"fp8 quantize: wgmma_keys needs blocks of a multiple of 16 rows, got {block}")
    if transposed:
        s_alloc = _round16(s)
        buf = _empty((b, h, dq, s_alloc), FP8, dev)
        data = buf if wgmma_keys else buf[..., :s]
        y_strides = (buf.stride(0), buf.stride(1), buf.stride(3), buf.stride(2))
        s_store, d_store = s_alloc, dq
    else:
        d_alloc = _round16(dq)
        buf = _empty((b, h, s, d_alloc), FP8, dev)
        data = buf[..., :dq]
        y_strides = tuple(buf.stride())
        s_store, d_store = s, d_alloc
    scale = _empty((b, h, triton_cdiv(s, block)), torch.float32, dev)
    out = Fp8Operand(data, scale, block, transposed, rotate, wgmma_keys, s)
    if b * h == 0 or s_store == 0:
        return out
    from . import fp8_quant_kernel as qk
    grid = (triton_cdiv(s_store, block), h, b)
    if use_tile:
        rot = signed_hadamard(seed, bd, x.dtype, dev) if rotate else scale
        tiles, stages = _tile_pipeline(bd, rotate, transposed)
        qk.quantize_tile_kernel[(triton_cdiv(grid[0], tiles), h, b)](
            x, buf, scale, rot, *x.stride(), *y_strides, *scale.stride(), s, s_store, d, d_store,
            1.0 / math.sqrt(bd), BLOCK=block, BD=bd, ROTATE=rotate, EXACT=interpret, WGMMA_KEYS=wgmma_keys,
            TILES=tiles, STAGES=stages, num_warps=_tile_warps(block, bd))
        return out
    sg = signs(seed, bd, dev) if rotate else scale
    chunk = _chunk(block, bd, interpret)
    warps = max(4, min(16, chunk * bd // 1024))

    def launch(mode, gamax):
        qk.quantize_kernel[grid](x, buf, scale, sg, gamax, *x.stride(), *y_strides, *scale.stride(),
                                 s, s_store, d, d_store, 1.0 / math.sqrt(bd), BLOCK=block, CHUNK=chunk, BD=bd,
                                 LOG_BD=bd.bit_length() - 1, ROTATE=rotate, MODE=mode, EXACT=interpret,
                                 WGMMA_KEYS=wgmma_keys, num_warps=warps)

    if scaling == "block":
        launch(qk.MODE_BLOCK, scale)
    else:
        launch(qk.MODE_AMAX, scale)                 # tile amaxes into scale, then the global one
        gamax = scale.amax().reshape(1) if s > 0 else torch.zeros(1, device=dev)
        launch(qk.MODE_TENSOR, gamax)
    return out


def quantize_qkv(q, k, v, recipe: Fp8Recipe, block_m: int, block_n: int, v_transposed: bool = True,
                 v_wgmma_keys: bool = False):
    """The three operands of an FP8 attention: Q per block_m rows, K and V per block_n rows; Q and K rotated
    by the same M when recipe.hadamard. Returns (Fp8Operand q, k, v)."""
    rot = recipe.hadamard
    return (quantize(q, block=block_m, rotate=rot, seed=recipe.seed, scaling=recipe.scaling),
            quantize(k, block=block_n, rotate=rot, seed=recipe.seed, scaling=recipe.scaling),
            quantize(v, block=block_n, scaling=recipe.scaling, transposed=v_transposed, wgmma_keys=v_wgmma_keys))


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
