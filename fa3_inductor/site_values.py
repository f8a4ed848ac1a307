"""Fresh real tensors for a cut-out site's placeholders (site_subgraph.py): the shapes, strides, dtypes and
requires_grad of Dynamo's example values, drawn from a private generator (the caller's RNG stream is untouched).

q, k, v and floats of rank < 2 are standard normal. Anything else is read as a mask or a bias over keys and gets
a padding-style pattern along its last dim: in batch row b (dim 0) the first L_b keys are "visible" and the rest
are not, with 1 <= L_b < L whenever L > 1, so every row has keys on both sides and no row is fully masked in either
polarity (SDPA's True = attend, masked_fill's True = hide). bool: visible = True; integers: 1 / 0 (HF's
attention_mask); floats: normal / finfo.min (an additive mask, or a bias with padding added, as T5 builds it).
"""

from __future__ import annotations

import torch


def visible_keys(batch: int, length: int):
    """L_b for each batch row: at least half the keys, never all of them (when length > 1)."""
    if length <= 1:
        return [length] * batch
    return [max(1, length - 1 - (b % 4) * (length // 8)) for b in range(batch)]


def _pattern(shape, dtype, device, role: str, gen) -> torch.Tensor:
    if role in ("q", "k", "v") or (dtype.is_floating_point and len(shape) < 2):
        return torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)
    length = shape[-1] if shape else 1
    batch = shape[0] if len(shape) >= 2 else 1
    cut = torch.tensor(visible_keys(batch, length), device=device)
    vis = torch.arange(length, device=device)[None, :] < cut[:, None]           # (batch, length)
    vis = vis.reshape(batch, *([1] * (len(shape) - 2)), length) if len(shape) >= 2 else vis.reshape(shape)
    vis = vis.expand(shape)
    if dtype == torch.bool:
        return vis.clone()
    if not dtype.is_floating_point:
        return vis.to(dtype)
    noise = torch.randn(shape, dtype=torch.float32, device=device, generator=gen)
    return torch.where(vis, noise, torch.finfo(dtype).min).to(dtype)


def real_tensor(example: torch.Tensor, role: str, gen, device=None) -> torch.Tensor:
    """A real tensor laid out like `example` (a fake tensor) with values as the module docstring says."""
    shape, stride, dtype = tuple(example.shape), example.stride(), example.dtype
    device = device or example.device
    zero = [d for d, (n, s) in enumerate(zip(shape, stride)) if s == 0 and n > 1]
    if zero:    # broadcast (expanded) dims: fill the distinct elements, then expand as the example does
        small = [1 if d in zero else n for d, n in enumerate(shape)]
        base = real_tensor(torch.empty_strided(small, [1 if d in zero else s for d, s in enumerate(stride)],
                                               dtype=dtype, device="meta"), role, gen, device)
        t = base.expand(shape)
    else:
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        with torch.no_grad():
            t.copy_(_pattern(shape, dtype, device, role, gen))
    if example.requires_grad and dtype.is_floating_point:
        t = t.detach().requires_grad_(True)
    return t


def real_inputs(examples: list, roles: list[str], seed: int = 0, device=None) -> list:
    """Real values for every placeholder; constants (ints, floats) pass through. device: override (tests)."""
    dev = device or next((e.device for e in examples if isinstance(e, torch.Tensor) and e.device.type != "meta"),
                         torch.device("cpu"))     # (site_subgraph gives a relaid-out operand as a meta tensor)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for e, role in zip(examples, roles):
        if e is None:
            raise ValueError("a site input has no example value")
        out.append(real_tensor(e, role, gen, dev) if isinstance(e, torch.Tensor) else e)
    return out
