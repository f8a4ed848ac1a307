"""PyTorch reference implementation of a ScoreProgram attention: the semantics every kernel must match.

Forward and backward walk the queries in chunks, so the S×S score matrix is never materialised whole; each
chunk is computed in fp32 (more accurate than the eager graph it replaces, which the accuracy rule allows).
Shapes are canonical: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), Hq = G·Hkv, every operand 4-D
and broadcastable to (B, Hq, Sq, Sk).
"""

from __future__ import annotations

import math

import torch

from .program import ScoreProgram, derivative, unmasked

_CHUNK_BYTES = 128 << 20


def _unary(op, a):
    if op == "neg":
        return -a
    if op == "tanh":
        return torch.tanh(a)
    if op == "exp":
        return torch.exp(a)
    if op == "abs":
        return torch.abs(a)
    if op == "sigmoid":
        return torch.sigmoid(a)
    if op == "not":
        return torch.logical_not(a)
    if op == "identity":
        return a
    raise ValueError(op)


_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne,
    "and": torch.logical_and, "or": torch.logical_or,
}


def _as_tensor(x, like):
    # torch.full, not torch.tensor: no host-to-device copy (allowed while a CUDA graph is captured)
    return x if isinstance(x, torch.Tensor) else torch.full((), x, dtype=torch.float32, device=like.device)


def evaluate(expr, s, operands, q_idx, k_idx):
    """Evaluate a program expression on a score block `s` (fp32); operands already sliced to the block."""
    op = expr[0]
    if op == "score":
        return s
    if op == "const":
        return float(expr[1])
    if op == "operand":
        t = operands[expr[1]]
        return t if t.dtype == torch.bool else t.float()
    if op == "q_idx":
        return q_idx
    if op == "k_idx":
        return k_idx
    args = [evaluate(a, s, operands, q_idx, k_idx) for a in expr[1:]]
    if op == "where":
        c, a, b = args
        return torch.where(_as_tensor(c, s).bool(), _as_tensor(a, s), _as_tensor(b, s))
    if len(args) == 1:
        return _unary(op, _as_tensor(args[0], s))
    return _BINARY[op](_as_tensor(args[0], s), _as_tensor(args[1], s))


def structural_mask(prog: ScoreProgram, q0: int, q1: int, sq: int, sk: int, device):
    """Boolean (q1-q0, Sk) tensor of visible positions, or None when the program has no structural mask."""
    if prog.causal == "none":
        return None
    i = torch.arange(q0, q1, device=device).view(-1, 1)
    j = torch.arange(sk, device=device).view(1, -1)
    offset = 0 if prog.causal == "top_left" else sk - sq
    visible = j <= i + offset
    if prog.window is not None:
        visible &= j >= i + offset - prog.window
    return visible


def _slice_operand(t, q0, q1):
    return t[:, :, q0:q1] if t.shape[2] != 1 else t


def _chunk_scores(prog, qc, k, ops, q0, sq):
    """fp32 scores after the whole program for the query chunk qc, which starts at absolute row q0 of a
    length-sq query sequence; ops are the operands already sliced to the chunk. Shape (B, Hq, rows, Sk)."""
    b, hq, rows, d = qc.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    s = torch.matmul(qc.float().reshape(b, hkv, g, rows, d), k.float().unsqueeze(2).transpose(-1, -2))
    s = s.reshape(b, hq, rows, sk)
    q_idx = torch.arange(q0, q0 + rows, device=qc.device, dtype=torch.float32).view(-1, 1)
    k_idx = torch.arange(sk, device=qc.device, dtype=torch.float32).view(1, -1)
    x = _as_tensor(evaluate(prog.expr, s, ops, q_idx, k_idx), s).float().expand(b, hq, rows, sk)
    vis = structural_mask(prog, q0, q0 + rows, sq, sk, qc.device)
    if vis is not None:
        x = x.masked_fill(~vis, -math.inf)
    return x


def _chunk_attend(prog, x, v):
    """Softmax over keys and the P·V product for one chunk; returns (out fp32, lse fp32, p fp32).

    p is normalised by the running max and sum themselves, not recomputed as exp(x - lse): on a row whose
    max is ~finfo.min (every key hit by an additive finfo.min mask) m + log(l) rounds to m, and exp(x - lse)
    would give 1 instead of 1/l. Rows with no finite score get p = NaN ("nan") or 0 (their output is set
    by `empty_row`); lse is -inf there.
    """
    b, hq, rows, sk = x.shape
    hkv = v.shape[1]
    m = x.amax(dim=-1, keepdim=True)
    empty = m == -math.inf
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    e = torch.exp(x - m_safe)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(empty, torch.ones_like(l), l)
    if prog.empty_row == "nan":
        p = torch.where(empty, torch.full_like(p, math.nan), p)
    out = torch.matmul(p.reshape(b, hkv, hq // hkv, rows, sk), v.float().unsqueeze(2)).reshape(b, hq, rows, -1)
    lse = (m_safe + torch.log(l)).squeeze(-1)
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, -math.inf), lse)
    if prog.empty_row == "uniform":
        out = uniform_fill(out, lse, v)
    return out, lse, p


def uniform_fill(out, lse, v):
    """empty_row="uniform": rows with lse = -inf (no visible key) get the mean of v over all keys."""
    b, hq, rows, _ = out.shape
    hkv = v.shape[1]
    if v.shape[2] == 0:
        return out
    mean = v.float().mean(dim=2)                                        # (B, Hkv, Dv)
    mean = mean.unsqueeze(2).expand(b, hkv, hq // hkv, mean.shape[-1]).reshape(b, hq, 1, -1)
    return torch.where((lse == -math.inf).unsqueeze(-1), mean.to(out.dtype), out)


def _chunk_rows(q, k) -> int:
    b, hq, sq, _ = q.shape
    per_row = max(1, b * hq * k.shape[2] * 4 * 4)
    return max(1, min(sq, _CHUNK_BYTES // per_row))


def forward(q, k, v, operands, prog: ScoreProgram):
    """Returns (out in v's dtype, lse fp32 (B, Hq, Sq))."""
    b, hq, sq, _ = q.shape
    out = torch.empty(b, sq, hq, v.shape[-1], dtype=v.dtype, device=q.device).transpose(1, 2)   # SDPA's layout
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    step = _chunk_rows(q, k)
    with torch.no_grad():
        for q0 in range(0, sq, step):
            q1 = min(sq, q0 + step)
            ops = [_slice_operand(t, q0, q1) for t in operands]
            o, l, _ = _chunk_attend(prog, _chunk_scores(prog, q[:, :, q0:q1], k, ops, q0, sq), v)
            out[:, :, q0:q1] = o.to(v.dtype)
            lse[:, :, q0:q1] = l
    return out, lse


def backward(dout, q, k, v, operands, prog: ScoreProgram, rows: tuple[int, int] | None = None):
    """Returns (dq, dk, dv, [d operand for each operand whose operand_grad flag is set]).

    Recomputes each chunk's probabilities, then the standard attention backward:
    dP = dO·Vᵀ, dX = P ⊙ (dP − rowsum(dO ⊙ O)), and the chain rule through the program's symbolic derivative.
    rows: only the contributions of query rows [r0, r1) (dq zero elsewhere); kernels hand such a band here.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    want = prog.operand_grad or (False,) * len(operands)
    d_score = derivative(prog.expr, ("score",))
    d_operand = [derivative(prog.expr, ("operand", n)) if w else None for n, w in enumerate(want)]
    r0, r1 = rows if rows is not None else (0, sq)
    dq = (torch.empty if rows is None else torch.zeros)(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dops = [torch.zeros(t.shape, dtype=torch.float32, device=q.device) if w else None
            for t, w in zip(operands, want)]
    kf, vf = k.float(), v.float()
    lse_all = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)   # finite outside the band
    step = _chunk_rows(q, k)
    with torch.no_grad():
        for q0 in range(r0, r1, step):
            q1 = min(r1, q0 + step)
            rows = q1 - q0
            qc = q[:, :, q0:q1].float()
            ops = [_slice_operand(t, q0, q1) for t in operands]
            x = _chunk_scores(prog, qc, kf, ops, q0, sq)
            o, lse_all[:, :, q0:q1], p = _chunk_attend(prog, x, vf)
            do = dout[:, :, q0:q1].float()
            p5 = p.reshape(b, hkv, g, rows, sk)
            do5 = do.reshape(b, hkv, g, rows, -1)
            dv += torch.matmul(p5.transpose(-1, -2), do5).sum(2)
            dp = torch.matmul(do5, vf.unsqueeze(2).transpose(-1, -2)).reshape(b, hq, rows, sk)
            delta = (do * o).sum(-1, keepdim=True)
            dx = p * (dp - delta)
            dx = torch.where(p == 0, torch.zeros_like(dx), dx)  # hidden positions carry no gradient
            _chain_rule(dx, qc, kf, operands, ops, q0, q1, d_score, d_operand, dq, dk, dops)
    if prog.empty_row == "uniform":
        extra_grads = uniform_rows_grads(dout, q, k, v, operands, prog, lse_all)
        if extra_grads is not None:
            dq += extra_grads[0]
            dk += extra_grads[1]
            dv += extra_grads[2]
            for n, gr in enumerate(extra_grads[3]):
                if gr is not None:
                    dops[n] += gr
    extra = [dops[n].to(operands[n].dtype) for n, w in enumerate(want) if w]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), extra


def _capturing(device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:
        return False


IMPRECISE_LSE = 1e4   # |lse| beyond this: fp32 lse = max + log(l) has lost log(l) (ulp(1e4) ~ 1e-3)


def enormous_constant(expr) -> bool:
    """Does the expression hold a finite constant beyond IMPRECISE_LSE (a -1e9 or finfo.min fill)."""
    if expr[0] == "const":
        return math.isfinite(expr[1]) and abs(expr[1]) > IMPRECISE_LSE
    return any(enormous_constant(a) for a in expr[1:] if isinstance(a, tuple))


def enormous_possible(prog: ScoreProgram, operands) -> bool:
    """Can a finite score reach |x| > IMPRECISE_LSE without absurd inputs: a float operand (a dense additive
    mask or bias) or an enormous finite constant in the program."""
    return any(t.dtype.is_floating_point for t in operands) or enormous_constant(prog.expr)


def imprecise_rows(prog: ScoreProgram, lse, operands=()) -> tuple[int, int] | None:
    """The query-row band [r0, r1) holding rows whose fp32 lse cannot carry log(l): rows whose every score
    is an enormous fill (finfo.min or -1e9 added by a dense mask; eager then averages v over the keys with
    the largest score). Kernels recover p = exp(x − lse) wrongly there (1 instead of 1/l); the Triton backward
    finds these rows on the device and computes their gradient itself (attn_bwd_imprecise,
    templates_uniform.py); this host-side finder (`backward(rows=...)` takes its band) serves tests. Only
    programs with a float operand or an enormous constant can produce such rows; finding them syncs with the
    device (skipped while a CUDA graph is being captured)."""
    if not enormous_possible(prog, operands):
        return None
    if lse.numel() == 0 or _capturing(lse.device):
        return None
    bad = torch.isfinite(lse) & (lse.abs() > IMPRECISE_LSE)
    if not bool(bad.any()):
        return None
    rows = bad.any(dim=1).any(dim=0).nonzero().flatten()
    return int(rows.min()), int(rows.max()) + 1


def uniform_rows_grads(dout, q, k, v, operands, prog: ScoreProgram, lse):
    """Gradient contributions of the rows that empty_row="uniform" fills (lse = -inf), or None if none.

    Such a row has p = 1/Sk on every key and out = mean of v; as autograd does through eager's y + mask,
    dX = p ⊙ (dP − rowsum(dO ⊙ out)) flows into s and the operands through `unmasked(expr)`. The reference
    backward adds this (fp32: dq, dk, dv, [d operand or None]); the Triton backward computes the same on the
    device without a host sync (attn_bwd_uniform, kernels/templates_uniform.py), tested against this. Only the
    query rows from the first to the last empty one are visited (finding them syncs with the device; while a
    CUDA graph is being captured every row is visited instead).
    """
    empty = lse == -math.inf
    sk = k.shape[2]
    b, hq, sq, d = q.shape
    if sk == 0:
        return None
    if _capturing(q.device):    # no host sync inside a CUDA graph: visit every row (the empty mask weights them)
        r0, r1 = 0, sq
    else:
        if not bool(empty.any()):
            return None
        rows_any = empty.any(dim=1).any(dim=0).nonzero().flatten()
        r0, r1 = int(rows_any.min()), int(rows_any.max()) + 1
    hkv = k.shape[1]
    g = hq // hkv
    want = prog.operand_grad or (False,) * len(operands)
    y = unmasked(prog.expr)
    d_score = derivative(y, ("score",))
    d_operand = [derivative(y, ("operand", n)) if w else None for n, w in enumerate(want)]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dops = [torch.zeros(t.shape, dtype=torch.float32, device=q.device) if w else None
            for t, w in zip(operands, want)]
    kf, vf = k.float(), v.float()
    vmean = vf.mean(dim=2, keepdim=True).unsqueeze(2)                   # (B, Hkv, 1, 1, Dv)
    step = _chunk_rows(q, k)
    with torch.no_grad():
        for q0 in range(r0, r1, step):
            q1 = min(r1, q0 + step)
            rows = q1 - q0
            qc = q[:, :, q0:q1].float()
            ops = [_slice_operand(t, q0, q1) for t in operands]
            p = (empty[:, :, q0:q1].float() / sk).unsqueeze(-1).expand(b, hq, rows, sk)
            do5 = dout[:, :, q0:q1].float().reshape(b, hkv, g, rows, -1)
            p5 = p.reshape(b, hkv, g, rows, sk)
            dv += torch.matmul(p5.transpose(-1, -2), do5).sum(2)
            dp = torch.matmul(do5, vf.unsqueeze(2).transpose(-1, -2))
            delta = (do5 * vmean).sum(-1, keepdim=True)
            dx = (p5 * (dp - delta)).reshape(b, hq, rows, sk)
            _chain_rule(dx, qc, kf, operands, ops, q0, q1, d_score, d_operand, dq, dk, dops)
    return dq, dk, dv, dops


def _chain_rule(dx, qc, kf, operands, ops, q0, q1, d_score, d_operand, dq, dk, dops):
    """From dX of query rows [q0, q1) (fp32, (B, Hq, rows, Sk)) through the program's local derivatives: set
    dq of those rows, add to dk and to the operand gradients (ops: the operands sliced to those rows)."""
    b, hq, rows, sk = dx.shape
    hkv, d = kf.shape[1], kf.shape[-1]
    g = hq // hkv
    s = torch.matmul(qc.reshape(b, hkv, g, rows, d), kf.unsqueeze(2).transpose(-1, -2)).reshape(b, hq, rows, sk)
    q_idx = torch.arange(q0, q1, device=qc.device, dtype=torch.float32).view(-1, 1)
    k_idx = torch.arange(sk, device=qc.device, dtype=torch.float32).view(1, -1)

    def local(e):
        return _as_tensor(evaluate(e, s, ops, q_idx, k_idx), s).float()
    ds = (dx * local(d_score)).reshape(b, hkv, g, rows, sk)
    dq[:, :, q0:q1] = torch.matmul(ds, kf.unsqueeze(2)).reshape(b, hq, rows, d)
    dk += torch.matmul(ds.transpose(-1, -2), qc.reshape(b, hkv, g, rows, d)).sum(2)
    for n, de in enumerate(d_operand):
        if de is None:
            continue
        target = dops[n][:, :, q0:q1] if operands[n].shape[2] != 1 else dops[n]
        target += _reduce_to(dx * local(de), target.shape)


def _reduce_to(t, shape):
    """Sum a broadcast gradient back to an operand's (4-D, size-1-broadcast) shape."""
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t
