"""Head dim 256 backward sweep: every candidate tile config of the portable backward's two kernels, timed alone,
beside FlashAttention-2 (SDPA's flash backend), on the FA3 paper's grid (16k tokens, H = 2048 / 256 = 8, bf16).

    python bench/bwd256_sweep.py [--out DIR] [--budget SECONDS] [--seqs 1024,4096,16384]
    python bench/bwd256_sweep.py --smoke        # CPU, Triton interpreter, tiny fp16 shapes: the script's logic

Per point (S, causal):
- attn_bwd_dkdv for each DKDV config and attn_bwd_dq for each DQ config (kernels/triton_portable.py
  BackwardLaunches: the launches `backward` tunes), triton.testing.do_bench median; each config's gradients
  (dK, dV or dQ) checked against an fp32 reference: max error <= 2 x the error of SDPA-flash's bf16 gradients
  + GUARD x max |reference|;
- attn_bwd_pre, the portable forward, `tp.backward` as the op runs it (tuned), and portable fwd+bwd;
- SDPA-flash forward and forward+backward (FA2), so FA2's backward = fwd+bwd - fwd.
Summary: best dkdv + best dq + pre against FA2's backward, and portable fwd+bwd against FA2's (issue 3's bar:
>= 1.0). Writes bwd256_sweep.json and bwd256_sweep.md under --out. The cross-compiled register / spill facts of
the same configs: bench/bwd256_sass.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if "--smoke" in sys.argv:       # before triton is imported: the interpreter is chosen at import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fa3_inductor.kernels import triton_portable as tp  # noqa: E402
from fa3_inductor.kernels.program import ScoreProgram  # noqa: E402

D = 256
TOKENS = 16384
SEQS = (16384, 4096, 1024)        # the long sequences first: they are the ones short of FA2 by most
# (BLOCK_M queries, BLOCK_N keys, warps, stages[, DV_BLOCK_M]): DV_BLOCK_M > 0 is the two-sweep dK/dV schedule
DKDV = [
    (64, 32, 8, 2),          # the list's head before: one sweep, 32 keys (mma.sync: 8 warps need 128 rows for wgmma)
    (64, 64, 8, 1),          # one sweep, 64 keys: wgmma, but S and dP computed by both warpgroups; spills
    (32, 128, 8, 2, 32),     # two sweeps, 128 keys, 32-query blocks in both (the tuner's default)
    (32, 128, 8, 2, 64),     # dV sweep over 64-query blocks (spills with GQA / operands)
    (32, 128, 8, 3, 32),
    (16, 128, 8, 3, 32),
    (16, 64, 4, 2, 64),      # two sweeps, one warpgroup of 64 keys
]
DQ = [
    (128, 64, 8, 1),         # the list's head before (spills in the loop)
    (128, 32, 8, 1),
    (128, 32, 8, 2),
    (128, 32, 8, 3),
    (128, 16, 8, 4),
    (64, 32, 8, 2),
]
SMOKE_DKDV = [(16, 32, 4, 1), (16, 32, 4, 1, 32)]
SMOKE_DQ = [(32, 16, 4, 1)]
GUARD = 1e-3            # absolute guard, times max |reference|




def program(causal: bool) -> ScoreProgram:
    return ScoreProgram(("mul", ("score",), ("const", D ** -0.5)), causal="top_left" if causal else "none")


def reference_grads(q, k, v, dout, causal):
    """fp32 (IEEE, no TF32) dq, dk, dv of softmax(q kᵀ / 16) v, a few heads at a time."""
    b, h, s, _ = q.shape
    flat = [t.reshape(b * h, s, -1) for t in (q, k, v, dout)]
    per = max(1, int(2 ** 31 // (s * s * 4 * 3)))        # a few GB of fp32 scores at a time
    outs = [torch.empty(b * h, s, D, dtype=torch.float32, device=q.device) for _ in range(3)]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in range(0, b * h, per):
            qq, kk, vv = (t[i:i + per].float().requires_grad_() for t in flat[:3])
            sc = torch.matmul(qq, kk.transpose(1, 2)) * D ** -0.5
            if causal:
                sc = sc.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), -math.inf)
            o = torch.matmul(torch.softmax(sc, dim=-1), vv)
            for dst, g in zip(outs, torch.autograd.grad(o, (qq, kk, vv), flat[3][i:i + per].float())):
                dst[i:i + per] = g
            del sc, o
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return [t.reshape(b, h, s, D) for t in outs]


def max_err(a, r) -> float:
    return (a.float() - r).abs().max().item()


class Point:
    """One grid point: inputs, reference gradients, PyTorch's own gradient error, and the timer."""

    def __init__(self, s, causal, dev, dtype, smoke):
        self.s, self.causal, self.dev, self.smoke = s, causal, dev, smoke
        self.b, self.h = (1, 2) if smoke else (TOKENS // s, 2048 // D)
        gen = torch.Generator(device=dev).manual_seed(s + causal)
        self.q, self.k, self.v, self.dout = (torch.randn(self.b, self.h, s, D, device=dev, dtype=dtype,
                                                         generator=gen) for _ in range(4))
        self.prog = program(causal)
        self.ref = reference_grads(self.q, self.k, self.v, self.dout, causal)
        self.scale = [max(1.0, r.abs().max().item()) for r in self.ref]
        torch_grads = self.torch_grads()
        self.torch_err = [max_err(g, r) for g, r in zip(torch_grads, self.ref)]
        self.fwd_flops = 4.0 * self.b * self.h * s * s * D / (2 if causal else 1)

    def torch_grads(self):
        """SDPA's gradients in the input dtype (flash on CUDA, math on CPU): PyTorch's own error."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        leaves = [t.detach().clone().requires_grad_() for t in (self.q, self.k, self.v)]
        backend = SDPBackend.MATH if self.smoke else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*leaves, is_causal=self.causal)
        out.backward(self.dout)
        return [t.grad for t in leaves]

    def ok(self, which, grads) -> tuple[bool, list]:
        """which: indices into (dq, dk, dv) that grads holds."""
        errs = [max_err(g, self.ref[i]) for i, g in zip(which, grads)]
        good = all(e <= 2 * self.torch_err[i] + GUARD * self.scale[i] for i, e in zip(which, errs))
        return good, errs

    def time(self, fn) -> float:
        if self.smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep_point(pt: Point, dkdv_cfgs, dq_cfgs, budget_left):
    rec = {"S": pt.s, "causal": pt.causal, "B": pt.b, "H": pt.h, "D": D, "fwd_flops": pt.fwd_flops,
           "torch_grad_err": dict(zip(("dq", "dk", "dv"), pt.torch_err)), "dkdv": [], "dq": []}
    q, k, v, dout, prog = pt.q, pt.k, pt.v, pt.dout, pt.prog
    out, lse = tp.forward(q, k, v, [], prog)
    run = tp.BackwardLaunches(dout, q, k, v, [], lse, prog, out)
    run.pre()
    rec["pre_ms"] = pt.time(run.pre)
    for kind, cfgs, launch, which in (("dkdv", dkdv_cfgs, run.dkdv, (1, 2)), ("dq", dq_cfgs, run.dq, (0,))):
        for cfg in cfgs:
            row = {"config": list(cfg)}
            rec[kind].append(row)
            if budget_left() < 0:
                row["skipped"] = "budget"
                continue
            try:
                for n in which:
                    run.grads[n].fill_(math.nan)
                launch(cfg)
                good, errs = pt.ok(which, [run.grads[n] for n in which])
                row["max_err"], row["ok"] = errs, good
                row["ms"] = pt.time(lambda: launch(cfg))
                print(f"  {kind} {str(cfg):22s} {row['ms']:8.3f} ms  err {' '.join(f'{e:.3g}' for e in errs)}"
                      f"{'' if good else '  FAILS the accuracy bound'}", flush=True)
            except Exception as exc:
                row["error"] = repr(exc)[:300]
                print(f"  {kind} {cfg} failed: {row['error']}", flush=True)
    # as the op runs it: the portable forward and `tp.backward` with the tuner's picks
    fwd = lambda: tp.forward(q, k, v, [], prog)
    bwd = lambda: tp.backward(dout, q, k, v, [], out, lse, prog)
    grads = bwd()
    good, errs = pt.ok((0, 1, 2), grads[:3])
    rec["backward"] = {"ms": pt.time(bwd), "max_err": errs, "ok": good,
                       "tuned": {kind: tp._TUNED.get((kind,) + run.tune_key) for kind in ("dkdv", "dq")}}
    rec["portable_fwd_ms"] = pt.time(fwd)
    rec["portable_fwdbwd_ms"] = pt.time(lambda: tp.backward(dout, q, k, v, [], *fwd(), prog))
    if not pt.smoke:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def fa2_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=pt.causal)

        def fa2_fwdbwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(*leaves, is_causal=pt.causal)
            o.backward(dout)
            for t in leaves:
                t.grad = None
        rec["fa2_fwd_ms"] = pt.time(fa2_fwd)
        rec["fa2_fwdbwd_ms"] = pt.time(fa2_fwdbwd)
    summarize(rec)
    return rec


def _best(rows):
    good = [r for r in rows if "ms" in r and r.get("ok")]
    return min(good, key=lambda r: r["ms"]) if good else None


def summarize(rec):
    bd, bq = _best(rec["dkdv"]), _best(rec["dq"])
    if bd and bq:
        rec["best_bwd_ms"] = rec["pre_ms"] + bd["ms"] + bq["ms"]
        rec["best_fwdbwd_ms"] = rec["portable_fwd_ms"] + rec["best_bwd_ms"]
    if "fa2_fwdbwd_ms" in rec:
        rec["fa2_bwd_ms"] = rec["fa2_fwdbwd_ms"] - rec["fa2_fwd_ms"]
        rec["fa2_over_portable_fwdbwd"] = rec["fa2_fwdbwd_ms"] / rec["portable_fwdbwd_ms"]
        if "best_fwdbwd_ms" in rec:
            rec["fa2_over_best_fwdbwd"] = rec["fa2_fwdbwd_ms"] / rec["best_fwdbwd_ms"]


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(header, recs):
    lines = list(header) + [
        "", "## Summary (ms; ratio = FA2 / ours, >= 1.00 meets issue 3's bar)", "",
        "| S | causal | FA2 fwd+bwd | FA2 bwd | portable fwd | pre | best dkdv | best dq | best bwd | best fwd+bwd "
        "| ratio | tp.backward (tuned) | portable fwd+bwd (tuned) | ratio | tuned picks |",
        "|" + "---|" * 15]
    for r in recs:
        bd, bq = _best(r["dkdv"]), _best(r["dq"])
        lines.append(
            f"| {r['S']} | {int(r['causal'])} | {fmt(r.get('fa2_fwdbwd_ms'))} | {fmt(r.get('fa2_bwd_ms'))} "
            f"| {fmt(r.get('portable_fwd_ms'))} | {fmt(r.get('pre_ms'))} "
            f"| {fmt(bd and bd['ms'])} {tuple(bd['config']) if bd else ''} "
            f"| {fmt(bq and bq['ms'])} {tuple(bq['config']) if bq else ''} | {fmt(r.get('best_bwd_ms'))} "
            f"| {fmt(r.get('best_fwdbwd_ms'))} | {fmt(r.get('fa2_over_best_fwdbwd'), '.2f')} "
            f"| {fmt(r['backward']['ms'])}{'' if r['backward']['ok'] else ' (FAILS accuracy)'} "
            f"| {fmt(r.get('portable_fwdbwd_ms'))} | {fmt(r.get('fa2_over_portable_fwdbwd'), '.2f')} "
            f"| dkdv {r['backward']['tuned']['dkdv']}, dq {r['backward']['tuned']['dq']} |")
    lines += ["", "## Every config (ms; useful TFLOPS: dkdv 4 GEMMs = 2x fwd FLOPs, dq 3 GEMMs = 1.5x; "
              "err = max |ours - fp32 ref| of (dk, dv) / (dq), bound = 2 x SDPA-flash bf16 error + guard)", "",
              "| S | causal | kernel | config | ms | TFLOPS | err | torch err | ok |", "|" + "---|" * 9]
    for r in recs:
        for kind, mult, idx in (("dkdv", 2.0, (1, 2)), ("dq", 1.5, (0,))):
            terr = " ".join(fmt(r.get("torch_grad_err", {}).get(("dq", "dk", "dv")[i])) for i in idx)
            for row in r[kind]:
                ms = row.get("ms")
                tf = mult * r["fwd_flops"] / ms / 1e9 if ms else None
                status = row.get("error") or row.get("skipped") or ("yes" if row.get("ok") else "NO")
                err = " ".join(fmt(e) for e in row.get("max_err", [])) or "-"
                lines.append(f"| {r['S']} | {int(r['causal'])} | {kind} | {tuple(row['config'])} | {fmt(ms)} "
                             f"| {fmt(tf, '.0f')} | {err} | {terr} | {status[:80]} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; configs past it are skipped")
    ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 16384,4096,1024)")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, S=64, fp16: checks the script only")
    args = ap.parse_args(argv)
    t0 = time.time()
    budget_left = lambda: args.budget - (time.time() - t0)
    if args.smoke:
        dev, dtype, seqs, dkdv_cfgs, dq_cfgs = torch.device("cpu"), torch.float16, (64,), SMOKE_DKDV, SMOKE_DQ
    else:
        if not torch.cuda.is_available():
            print("CUDA is required (or --smoke)")
            return 1
        dev, dtype, dkdv_cfgs, dq_cfgs = torch.device("cuda"), torch.bfloat16, DKDV, DQ
        seqs = tuple(int(x) for x in args.seqs.split(",")) if args.seqs else SEQS
    import triton
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter)"
    header = [f"# Portable backward at D=256, per tile config, {datetime.datetime.now().isoformat(timespec='seconds')}",
              f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; commit {common.git_commit()}; "
              f"{'fp16 smoke run' if args.smoke else 'bf16'}, {TOKENS} tokens, H*D = 2048"]
    print("\n".join(header), flush=True)
    os.makedirs(args.out, exist_ok=True)
    recs = []
    for s in seqs:
        for causal in (False, True):
            if budget_left() < 0:
                print(f"S={s} causal={int(causal)}: skipped (budget)")
                continue
            print(f"S={s} causal={int(causal)}", flush=True)
            try:
                pt = Point(s, causal, dev, dtype, args.smoke)
                recs.append(sweep_point(pt, dkdv_cfgs, dq_cfgs, budget_left))
                r = recs[-1]
                print(f"  => best bwd {fmt(r.get('best_bwd_ms'))} ms, FA2 bwd {fmt(r.get('fa2_bwd_ms'))} ms; "
                      f"portable fwd+bwd {fmt(r.get('portable_fwdbwd_ms'))} vs FA2 {fmt(r.get('fa2_fwdbwd_ms'))}",
                      flush=True)
                del pt
            except Exception as exc:
                traceback.print_exc()
                recs.append({"S": s, "causal": causal, "error": repr(exc)[:300], "dkdv": [], "dq": [],
                             "backward": {"ms": None, "ok": False, "tuned": {"dkdv": None, "dq": None}}})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    header.append(f"elapsed {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, "bwd256_sweep.json"), "w") as fh:
        json.dump({"header": header, "points": recs}, fh, indent=1, default=str)
    lines = markdown(header, recs)
    with open(os.path.join(args.out, "bwd256_sweep.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
