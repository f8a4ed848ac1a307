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
    return _split(sk, split_cap(b, hk, device, splits), quantum)


def _split(sk: int, cap: int, quantum: int) -> tuple[int, int]:
    """(number of splits, keys per split) of sk keys into at most cap splits of a multiple of quantum keys."""
    blocks = max(1, -(-sk // quantum))
    chunk = -(-blocks // min(cap, blocks)) * quantum
    return max(1, -(-sk // chunk)), chunk


class _Plan:
    """What a decode call's shape class pins (program, dtypes, batch, heads, query length, head dims, operand
    dtypes and broadcast pattern, device, split override): the generated module, BLOCK_M, the split cap, the
    settled config per (length bucket, split count), and the launch sites per Triton specialisation of the
    call's arguments. Lengths, strides and alignments vary from call to call (a DynamicCache grows every
    token), so each call classifies its integer arguments and pointers as Triton does (launcher.int_classes /
    launcher.aligned) and picks the sites compiled for exactly that; a growing cache reuses a handful of
    them. Holds no tensors (a plan outlives its calls; CUDA graph pools check for leaked tensors)."""

    __slots__ = ("key", "mod", "block_m", "cap", "quantum", "interpret_cfg", "tune_key", "configs", "cfgs",
                 "sites", "combine_kwargs", "last", "loose_lengths", "out_strides", "out_shape", "hk")

    def __init__(self, key, q, k, v, operands, prog, splits):
        spec, self.mod, skey, _ = tp._spec_and_module(prog, q, k, v, operands, key[-1] is not None, "decode")
        b, hq, sq, d = q.shape
        self.key = key
        self.block_m = max(16, _next_pow2(spec.G * sq))
        self.out_shape, self.hk = (b, hq, sq, v.shape[3]), k.shape[1]
        self.cap = split_cap(b, k.shape[1], q.device, splits)
        cuda = q.device.type == "cuda"
        self.quantum = QUANTUM if cuda else INTERPRET_CONFIG[0]
        self.interpret_cfg = None if cuda else INTERPRET_CONFIG
        self.tune_key = skey
        # (the interpreter's kernels have no parameters to read; nothing is compiled or cached there)
        params = getattr(self.mod.attn_decode, "params", ())
        self.loose_lengths = {"Sk", "coff", "chunk"} <= {p.name for p in params if p.do_not_specialize}
        self.configs = _configs(d, q.dtype, self.block_m)
        # sized by the cap, not this length's split count: a growing cache keeps one variant
        self.combine_kwargs = dict(BLOCK_S=max(2, _next_pow2(self.cap)))
        self.last = self.out_strides = None     # last: the latest settled _Call
        self.cfgs = {}      # (length bucket, split count) -> settled config
        self.sites = {}     # (config, split count, integer classes, alignments) -> _site's tuple

    def split(self, sk: int) -> tuple[int, int]:
        """split_plan(b, hk, sk, device, splits) for this plan's cap."""
        return _split(sk, self.cap, self.quantum)


_PLANS: dict = {}


def _plan_key(q, k, v, operands, prog, splits):
    dev = q.device
    interpret = (INTERPRET_CONFIG, INTERPRET_SPLITS) if dev.type == "cpu" and tp.interpreting() else None
    # an operand's batch, head and query sizes are fixed with q's; its key axis counts only as broadcast or not
    ops = tuple([(t.dtype, *t.shape[:3], t.shape[3] == 1) for t in operands]) if operands else ()
    return (prog, dev, splits, q.dtype, v.dtype, q.shape, k.shape[1], v.shape[3], ops, interpret)


def _site(plan: _Plan, cfg, n_split: int, ints: list, al):
    """(decode Site, combine Site, decode kwargs, al) for this specialisation: a key that pins everything the
    compiled kernels depend on — the plan, the config, the split count (FINAL, the partial buffers' strides) and
    how Triton classifies every integer argument (ints) and pointer (al: launcher.aligned) of the launches (the
    rest follows from the plan)."""
    if plan.loose_lengths:  # Sk, coff, chunk (the last three): Triton does not specialise on their values
        classes = launcher.int_classes(ints[:-3]) + (launcher.int_types(ints[-3:]),)
    else:
        classes = launcher.int_classes(ints)
    skey = (cfg, n_split, classes, al)
    hit = plan.sites.get(skey)
    if hit is None:
        base = ("decode", plan.key) + skey
        bn, warps, stages = cfg
        kwargs = dict(BLOCK_M=plan.block_m, BLOCK_N=bn, FINAL=n_split == 1, num_warps=warps, num_stages=stages)
        hit = plan.sites[skey] = (launcher.Site(base), launcher.Site(base + ("combine",)), kwargs, al)
    return hit


class _Call:
    """What a plan's call derives from its layout (`sig`: the inputs' strides, the key length, each operand's key
    extent and strides) and its pointers' alignment (`al`): the split, the partial buffers' size, every integer
    launch argument, and the settled launch sites (None until the tuner has settled this length bucket). A
    call with the previous call's layout (the other layers of a step; every step of a StaticCache) reuses it
    and only allocates and launches. Holds no tensors."""

    __slots__ = ("sig", "al", "n_split", "chunk", "at", "rows", "op_ints", "tail", "combine_tail", "ints", "hit")

    def __init__(self, plan, sig, al, sq: int, prog: ScoreProgram):
        qs, ks, vs, sk, ops = sig
        b, hq, _, dv = plan.out_shape
        self.sig, self.al = sig, al
        self.n_split, self.chunk = n_split, chunk = plan.split(sk)
        if n_split == 1:    # written straight into out / lse: no partial buffers
            pstrides, lstrides = _NO_PART
            self.at = self.rows = 0
        else:
            # one allocation for both partial buffers, (B, Hq, Sq, splits) lse partials first, then the 16-byte
            # aligned (B, Hq, Sq, splits, Dv) out partials; the kernels read them only through these strides
            rows = b * hq * sq * n_split
            self.at = -(-rows // 4) * 4
            self.rows = self.at + rows * dv
            lstrides = (hq * sq * n_split, sq * n_split, n_split, 1)
            pstrides = (hq * sq * n_split * dv, sq * n_split * dv, n_split * dv, dv, 1)
        coff = sk - sq if prog.causal == "bottom_right" else 0
        os_, ls_ = plan.out_strides
        self.tail = (*qs, *ks, *vs, *os_, *ls_, *pstrides, *lstrides, sq, sk, coff, chunk)
        self.combine_tail = (*pstrides, *lstrides, *os_, *ls_, n_split)
        # what the plan and the split count do not fix: the inputs' strides and pointers, the lengths (out, lse
        # and the partials are fresh contiguous allocations, aligned by the allocator; the partial outputs
        # start a multiple of 16 bytes into theirs)
        if ops:
            full = (b, hq, sq, sk)
            # each operand read through its strides expanded to (B, Hq, Sq, Sk) (its first three sizes: the
            # plan key)
            oi = self.op_ints = [tuple([st if n == f else 0 for n, st, f in zip((*kind[1:4], n3), strides, full)])
                                 for kind, (n3, strides) in zip(plan.key[8], ops)]
            self.ints = [*[x[0] for x in oi], *[x[1] for x in oi], *[x[2] for x in oi], *[x[3] for x in oi], *qs,
                         *ks, *vs, sk, coff, chunk]
        else:
            self.op_ints = ()
            self.ints = [*qs, *ks, *vs, sk, coff, chunk]
        self.hit = None


def forward(q, k, v, operands, prog: ScoreProgram, splits: int | None = None):
    """Returns (out (B, Hq, Sq, Dv) in v.dtype, lse fp32 (B, Hq, Sq)); splits overrides the split count."""
    key = _plan_key(q, k, v, operands, prog, splits)
    plan = _PLANS.get(key)
    b, hq, sq, d = q.shape
    dev = q.device
    if plan is None:
        dv = v.shape[3]
        if b * hq * sq == 0:
            return tp._empty((b, hq, sq, dv), v.dtype, dev), tp._empty((b, hq, sq), torch.float32, dev)
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(key, q, k, v, operands, prog, splits)
    out = tp._empty(plan.out_shape, v.dtype, dev)
    lse = tp._empty(plan.out_shape[:3], torch.float32, dev)
    if plan.out_strides is None:        # the plan's first call: the buffers _empty gives, once
        assert out.is_contiguous() and lse.is_contiguous()
        plan.out_strides = (out.stride(), lse.stride())
    sk = k.shape[2]
    sig = (q.stride(), k.stride(), v.stride(), sk,
           tuple([(t.shape[3], t.stride()) for t in operands]) if operands else ())
    al = launcher.aligned([q, k, v, *operands])
    call = plan.last    # the previous call's (other layers, same step; a StaticCache's every step)
    if call is None or call.sig != sig or call.al != al:
        call = _Call(plan, sig, al, sq, prog)
    n_split = call.n_split
    if n_split == 1:
        part, lpart = out, lse
    else:
        lpart = tp._empty((call.rows,), torch.float32, dev)
        part = lpart[call.at:]
    if operands:
        op_args = []
        for t, ints in zip(operands, call.op_ints):
            op_args.append(t)
            op_args += ints
        args = (q, k, v, out, lse, part, lpart, *op_args, *call.tail)
    else:
        args = (q, k, v, out, lse, part, lpart, *call.tail)
    grid = (n_split, plan.hk, b)
    hit = call.hit
    if hit is None:
        cfg = plan.interpret_cfg or plan.cfgs.get((tp._bucket(sk), n_split))
        if cfg is not None:
            hit = call.hit = _site(plan, cfg, n_split, call.ints, al)
            plan.last = call
    if hit is not None:
        site, combine, kwargs, _ = hit
        site(plan.mod.attn_decode, grid, args, kwargs)
    else:       # not settled for this bucket yet: the tuner runs (or picks) the config
        def launch(cfg):
            site, _, kwargs, _ = _site(plan, cfg, n_split, call.ints, al)
            site(plan.mod.attn_decode, grid, args, kwargs)

        tkey = (plan.tune_key, plan.block_m, tp._bucket(sk), n_split)
        cfg = tp._launch_tuned("decode", tkey, d, q.dtype, dev, launch, configs=plan.configs,
                               interpret_config=INTERPRET_CONFIG)
        if cfg is not None:
            plan.cfgs[(tp._bucket(sk), n_split)] = cfg
        combine = None if n_split == 1 else _site(plan, cfg or plan.configs[0], n_split, call.ints, al)[1]
    if n_split != 1:
        combine(plan.mod.attn_decode_combine, (sq, hq, b), (part, lpart, out, lse, *call.combine_tail),
                plan.combine_kwargs)
    return out, lse


_NO_PART = ((0,) * 5, (0,) * 4)


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
