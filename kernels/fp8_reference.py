"""PyTorch emulation of the FP8 attention forward, with the same quantization math as the Triton kernels.

Used by the tests (what the kernels must reproduce) and by bench/accuracy.py (the same Table 3 on CPU).
- `rotate` / `quantize`: bit-for-bit the arithmetic of kernels/fp8_quant_kernel.py (same butterfly order,
  same fp32 operations, round to nearest even).
- `attention`: the online-softmax loop of the FP8 forward template over key blocks of `block_n` keys —
  per-tile descales, P quantized as e4m3(p · P_SCALE) relative to the running row max, V's tile scale
  folded into the rescale — in fp32, for any ScoreProgram (evaluated with kernels/reference.py).
- `dequantized_attention`: quantize, dequantize, then exact fp32 attention (no P quantization): the error
  floor that quantizing the inputs alone costs, from which the tests derive the kernels' bound.
"""

from __future__ import annotations

import math

import torch

from . import reference
from .fp8_recipe import E4M3_MAX, Fp8Recipe, hadamard_dim, signs
from .program import ScoreProgram
from .templates import P_SCALE

FP8 = torch.float8_e4m3fn


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n along the last dim (n a power of two), the kernel's butterfly order, in x's dtype."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 rows of x rotated by the recipe's M: pad to n = hadamard_dim(d), sign flip, FWHT, / sqrt(n)."""
    d = x.shape[-1]
    n = hadamard_dim(d)
    x = x.float()
    if n != d:
        x = torch.nn.functional.pad(x, (0, n - d))
    return fwht(x * signs(seed, n, x.device)) * torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)


def quantize(x: torch.Tensor, block: int, *, rotate_seed: int | None = None, scaling: str = "block"):
    """(e4m3 rows (B, H, S, Dq), fp32 scales (B, H, ceil(S / block))) as kernels/fp8_quant.quantize makes them."""
    x = rotate(x, rotate_seed) if rotate_seed is not None else x.float()
    b, h, s, d = x.shape
    nb = -(-s // block)
    tiles = torch.nn.functional.pad(x, (0, 0, 0, nb * block - s)).reshape(b, h, nb, block, d)
    amax = tiles.abs().amax(dim=(-1, -2))
    if scaling == "tensor":
        amax = amax.amax().expand_as(amax) if amax.numel() else amax
    big = torch.full_like(amax, E4M3_MAX)
    safe = torch.where(amax > 0, amax, big)
    scale, inv = safe / big, big / safe         # tensor / tensor: `scalar / t` is reciprocal(t) * scalar
    inv_rows = inv.repeat_interleave(block, dim=-1)[..., :s, None]
    return to_e4m3(x * inv_rows), scale.contiguous()


def quantize_qkv(q, k, v, recipe: Fp8Recipe, block_m: int, block_n: int):
    seed = recipe.seed if recipe.hadamard else None
    return (quantize(q, block_m, rotate_seed=seed, scaling=recipe.scaling),
            quantize(k, block_n, rotate_seed=seed, scaling=recipe.scaling),
            quantize(v, block_n, scaling=recipe.scaling))


def dequantize(x8: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    return x8.float() * scale.repeat_interleave(block, dim=-1)[..., : x8.shape[-2], None]


def attention(q8, qs, k8, ks, v8, vs, operands, prog: ScoreProgram, qblock: int, kblock: int, block_n: int):
    """Emulated FP8 forward: (out fp32 (B, Hq, Sq, Dv), lse fp32). block_n: the kernel's key tile (divides
    kblock); qblock / kblock: the quantization blocks of Q and of K, V."""
    b, hq, sq, _ = q8.shape
    hk, sk, dv = k8.shape[1], k8.shape[2], v8.shape[-1]
    g = hq // hk
    qf = dequantize(q8, qs, qblock).reshape(b, hk, g, sq, -1)      # exact: e4m3 times a scale of its tile
    k8f, v8f = k8.float(), v8.float()
    ksr = ks.repeat_interleave(g, dim=1)
    vsr = vs.repeat_interleave(g, dim=1)
    m = torch.full((b, hq, sq), -math.inf)
    l = torch.zeros((b, hq, sq))
    acc = torch.zeros((b, hq, sq, dv))
    vs_prev = torch.ones((b, hq, 1))
    q_idx = torch.arange(sq, dtype=torch.float32).view(-1, 1)
    dev = q8.device
    vis_all = reference.structural_mask(prog, 0, sq, sq, sk, dev)
    m, l, acc, vs_prev, q_idx = (t.to(dev) for t in (m, l, acc, vs_prev, q_idx))
    for n0 in range(0, sk, block_n):
        n1 = min(sk, n0 + block_n)
        t = n0 // kblock
        s = torch.matmul(qf, k8f[:, :, n0:n1].unsqueeze(2).transpose(-1, -2)).reshape(b, hq, sq, n1 - n0)
        s = s * ksr[:, :, t, None, None]
        k_idx = torch.arange(n0, n1, dtype=torch.float32, device=dev).view(1, -1)
        ops = [o[..., n0:n1] if o.shape[-1] != 1 else o for o in operands]
        x = reference._as_tensor(reference.evaluate(prog.expr, s, ops, q_idx, k_idx), s).float()
        x = x.expand(b, hq, sq, n1 - n0)
        if vis_all is not None:
            x = x.masked_fill(~vis_all[:, n0:n1], -math.inf)
        m_new = torch.maximum(m, x.amax(-1))
        m_use = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        p = torch.exp(x - m_use[..., None])
        alpha = torch.exp(m - m_use)
        l = l * alpha + p.sum(-1)
        vs_t = vsr[:, :, t, None]
        acc = acc * (alpha * (vs_prev / vs_t))[..., None]
        p8 = to_e4m3(p * P_SCALE).float().reshape(b, hk, g, sq, n1 - n0)
        acc = acc + torch.matmul(p8, v8f[:, :, n0:n1].unsqueeze(2)).reshape(b, hq, sq, dv)
        vs_prev, m = vs_t, m_new
    empty = m == -math.inf
    l_safe = torch.where(empty, torch.ones_like(l), l)
    out = acc * (vs_prev / P_SCALE)[..., None] / l_safe[..., None]
    out = torch.where(empty[..., None], torch.full_like(out, math.nan if prog.empty_row == "nan" else 0.0), out)
    lse = torch.where(empty, torch.full_like(m, -math.inf), m + torch.log(l_safe))
    return out, lse


def emulate(q, k, v, operands, prog: ScoreProgram, recipe: Fp8Recipe, qblock: int, kblock: int, block_n: int):
    """Quantize with the kernels' math, then the emulated FP8 forward: (out fp32, lse fp32)."""
    (q8, qs), (k8, ks), (v8, vs) = quantize_qkv(q, k, v, recipe, qblock, kblock)
    out, lse = attention(q8, qs, k8, ks, v8, vs, operands, prog, qblock, kblock, block_n)
    if prog.empty_row == "uniform":     # as the FP8 kernel: rows with no visible key take the mean of v
        out = reference.uniform_fill(out, lse, v)
    return out, lse


def dequantized_attention(q, k, v, operands, prog: ScoreProgram, recipe: Fp8Recipe, qblock: int, kblock: int):
    """Quantize, dequantize, exact fp32 attention (kernels/reference.py): the inputs' quantization error alone."""
    (q8, qs), (k8, ks), (v8, vs) = quantize_qkv(q, k, v, recipe, qblock, kblock)
    return reference.forward(dequantize(q8, qs, qblock), dequantize(k8, ks, kblock), dequantize(v8, vs, kblock),
                             operands, prog)
