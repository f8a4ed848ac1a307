"""Hypothesis strategies that write random attention programs in random spellings, and near misses.

A drawn `Program` is a plain Python function f(q, k, v, *extras) written the way some model would write
attention, plus the inputs to call it with and the number of sites the backend must rewrite.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st


@dataclasses.dataclass
class Program:
    fn: object
    inputs: list
    expected_sites: int
    description: str
    deterministic: bool = True
    grad_inputs: tuple = (0, 1, 2)     # which inputs must get gradients equal to eager


def repeat_kv(x, g):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, g, s, d).reshape(b, h * g, s, d)


def _product(spelling, a, b_t):
    """a (..., Sq, D) times b_t (..., D, Sk) in the drawn spelling."""
    if spelling == "@":
        return a @ b_t
    if spelling == "torch.matmul":
        return torch.matmul(a, b_t)
    if spelling == "method":
        return a.matmul(b_t)
    raise AssertionError(spelling)


def _transpose(spelling, k):
    if spelling == "transpose(-2,-1)":
        return k.transpose(-2, -1)
    if spelling == "transpose(2,3)":
        return k.transpose(2, 3)
    if spelling == "permute":
        return k.permute(0, 1, 3, 2)
    return k.mT


@st.composite
def attention_programs(draw, dtypes=(torch.float32,)):
    dtype = draw(st.sampled_from(dtypes))
    b = draw(st.integers(1, 2))
    hkv = draw(st.sampled_from([1, 2]))
    g = draw(st.sampled_from([1, 2, 4]))
    h = hkv * g
    sq = draw(st.sampled_from([1, 3, 5, 8, 13]))
    sk = draw(st.sampled_from([sq, 1, 4, 7, 9, 16])) if sq != 1 else draw(st.sampled_from([1, 6, 11]))
    d = draw(st.sampled_from([8, 16, 40, 64, 80, 96, 112]))
    style = draw(st.sampled_from(["eager", "eager", "eager", "einsum", "baddbmm", "bmm", "bart", "sdpa"]))
    gqa_spelling = draw(st.sampled_from(["repeat_kv", "repeat_interleave"])) if g > 1 else "none"
    scale = 1.0 / math.sqrt(d) if draw(st.booleans()) else draw(st.floats(0.05, 0.5))
    scale_where = draw(st.sampled_from(["mul", "div", "q", "split", "k"]))
    mask_kind = draw(st.sampled_from(["none", "additive", "additive_heads", "bool_where", "bool_fill_min",
                                      "bool_fill_inf", "padding", "alibi", "causal_tensor"]))
    softcap = draw(st.sampled_from([None, None, None, 20.0, 5.0]))
    softmax_spelling = draw(st.sampled_from(["F", "torch", "method", "dtype_fp32", "float_type_as"]))
    product = draw(st.sampled_from(["@", "torch.matmul", "method"]))
    kt = draw(st.sampled_from(["transpose(-2,-1)", "transpose(2,3)", "permute", "mT"]))
    dropout = draw(st.booleans())
    out_layout = draw(st.sampled_from(["bhsd", "bshd_flat"]))
    sdpa_causal = style == "sdpa" and mask_kind == "none" and draw(st.booleans())

    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32).to(dtype)
    q, k, v = rnd(b, h, sq, d), rnd(b, hkv, sk, d), rnd(b, hkv, sk, d)
    visible = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
    visible[..., 0] = True          # keep every row with a visible key for -inf masks (eager gives NaN else)
    extras, desc = [], [style, product if style == "eager" else "", kt, f"scale@{scale_where}", mask_kind]
    if mask_kind == "additive":
        extras.append(rnd(b, 1, sq, sk))
    elif mask_kind == "additive_heads":
        extras.append(rnd(1, h, 1, sk))
    elif mask_kind in ("bool_where", "bool_fill_min", "bool_fill_inf", "causal_tensor"):
        m = visible if mask_kind != "causal_tensor" else torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        if mask_kind == "causal_tensor":
            m[:, 0] = True
        extras.append(m)
    elif mask_kind == "padding":
        pad = torch.zeros(b, sk)
        pad[-1, : sk // 3] = torch.finfo(torch.float32).min     # left padding of the last batch row
        extras.append(pad.to(dtype))
    elif mask_kind == "alibi":
        extras.append((torch.arange(1, h + 1, dtype=torch.float32) * -0.1).view(h, 1, 1).to(dtype))

    def gqa(x):
        if g == 1:
            return x
        return repeat_kv(x, g) if gqa_spelling == "repeat_kv" else x.repeat_interleave(g, dim=1)

    def apply_mask(s, extra):
        if mask_kind in ("additive", "additive_heads"):
            return s + extra[0]
        if mask_kind in ("bool_where", "causal_tensor"):
            return torch.where(extra[0], s, float("-inf"))
        if mask_kind == "bool_fill_min":
            return s.masked_fill(~extra[0], torch.finfo(s.dtype).min)
        if mask_kind == "bool_fill_inf":
            return s.masked_fill(extra[0].logical_not(), float("-inf"))
        if mask_kind == "padding":
            return s + extra[0][:, None, None, :]
        if mask_kind == "alibi":
            pos = torch.arange(s.shape[-1], dtype=s.dtype, device=s.device)
            return s + extra[0] * pos
        return s

    def softmax(s):
        if softmax_spelling == "F":
            return F.softmax(s, dim=-1)
        if softmax_spelling == "torch":
            return torch.softmax(s, -1)
        if softmax_spelling == "method":
            return s.softmax(dim=-1)
        if softmax_spelling == "dtype_fp32":
            return F.softmax(s, dim=-1, dtype=torch.float32).to(q_dtype[0])
        return s.float().softmax(-1).type_as(s)

    q_dtype = [dtype]

    def finish(o):
        if out_layout == "bshd_flat":
            return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
        return o

    def _site_3d(q, kk, vv, extra, c):
        bsz, heads, n = q.shape[0], q.shape[1], q.shape[2]
        q3, k3, v3 = (t.reshape(bsz * heads, t.shape[2], t.shape[3]) for t in (q, kk, vv))
        bias = apply_mask(torch.zeros(bsz, heads, n, kk.shape[2], dtype=q.dtype, device=q.device), extra)
        bias = bias.reshape(bsz * heads, n, kk.shape[2])
        if style == "bart":       # BART's spelling: 3-D scores viewed as 4-D for the mask and back
            s = torch.bmm(q3, k3.transpose(1, 2)) * c
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            s = apply_mask(s.view(bsz, heads, n, kk.shape[2]), extra).view(bsz * heads, n, kk.shape[2])
            return torch.bmm(softmax(s), v3).view(bsz, heads, n, -1)
        if style == "baddbmm":    # BLOOM's spelling: beta·bias + alpha·(q @ kᵀ)
            s = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=1.0, alpha=c)
        else:
            s = torch.bmm(q3, k3.transpose(1, 2)) * c + bias
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        p = softmax(s)
        return torch.bmm(p, v3).view(bsz, heads, n, -1)

    def fn(q, k, v, *extra):
        q_dtype[0] = q.dtype
        if style == "sdpa":
            mask = None
            if mask_kind in ("additive", "additive_heads"):
                mask = extra[0]
            elif mask_kind in ("bool_where", "bool_fill_inf", "causal_tensor"):
                mask = extra[0]
            elif mask_kind in ("bool_fill_min", "padding", "alibi"):
                mask = apply_mask(torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                              dtype=q.dtype, device=q.device), extra)
            return finish(F.scaled_dot_product_attention(q, gqa(k), gqa(v), attn_mask=mask, is_causal=sdpa_causal,
                                                         scale=scale))
        kk, vv = gqa(k), gqa(v)
        c = scale
        if scale_where == "q":
            q = q * c
        elif scale_where == "k":
            kk = kk * c
        elif scale_where == "split":
            q, kk = q * math.sqrt(c), kk * math.sqrt(c)
        if style == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, kk)
        elif style in ("bmm", "baddbmm", "bart"):
            return finish(_site_3d(q, kk, vv, extra, c if scale_where in ("mul", "div") else 1.0))
        else:
            s = _product(product, q, _transpose(kt, kk))
        if scale_where == "mul":
            s = s * c
        elif scale_where == "div":
            s = s / (1.0 / c)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = apply_mask(s, extra)
        p = softmax(s)
        if dropout:
            p = F.dropout(p, p=0.1, training=False)
        if style == "einsum":
            return finish(torch.einsum("bhqk,bhkd->bhqd", p, vv))
        return finish(p @ vv)

    return Program(fn, [q, k, v] + extras, 1, " ".join(x for x in desc if x))


NEAR_MISSES = ["scores_reshaped", "softmax_dim_q", "weights_returned", "row_max_in_chain", "cumsum_in_chain", "head_mask_after",
               "where_from_scores", "dropout_training", "sdpa_dropout", "weights_transposed", "int_bias"]


@st.composite
def near_misses(draw):
    kind = draw(st.sampled_from(NEAR_MISSES))
    b, h, sq, sk, d = 2, 2, draw(st.sampled_from([3, 5])), draw(st.sampled_from([4, 7])), 8
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (sq, sk, sk))
    extras = []

    def fn(q, k, v, *extra):
        s = q @ k.transpose(-2, -1) * 0.3
        if kind == "scores_reshaped":       # heads folded into the query axis: not a regrouping of batch dims
            s = s.reshape(s.shape[0], s.shape[1] * s.shape[2], s.shape[3])
            return (s.softmax(-1) @ v[:, 0]).view(q.shape[0], q.shape[1], q.shape[2], -1)
        if kind == "softmax_dim_q":
            return s.softmax(dim=-2).transpose(-1, -2) @ q         # normalised over queries
        if kind == "row_max_in_chain":
            s = s - s.amax(-1, keepdim=True) * 0.5
        if kind == "cumsum_in_chain":
            s = s.cumsum(-1)
        if kind == "where_from_scores":
            s = torch.where(s > 0, s, s * 0.5)
        if kind == "int_bias":
            s = s + extra[0]
        p = s.softmax(-1)
        if kind == "weights_returned":
            return p @ v, p
        if kind == "head_mask_after":
            p = p * extra[0]
        if kind == "dropout_training":
            p = F.dropout(p, p=0.5, training=True)
        if kind == "sdpa_dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        if kind == "weights_transposed":
            return (v.transpose(-2, -1) @ p.transpose(-2, -1)).transpose(-2, -1)
        return p @ v

    if kind == "head_mask_after":
        extras.append(torch.rand(1, h, 1, 1, generator=gen))
    if kind == "int_bias":
        extras.append(torch.randint(-2, 2, (b, 1, sq, sk), generator=gen))
    random = kind in ("dropout_training", "sdpa_dropout")
    return Program(fn, [q, k, v] + extras, 0, kind, deterministic=not random)
