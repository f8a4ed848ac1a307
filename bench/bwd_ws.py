"""Backward-only timing of the Hopper warp-specialized backward's schedule variants beside the portable backward
and cuDNN's (SDPA), on the FA3 grid at 16k tokens (bf16, H·D = 2048), with a gradient check of every variant
against the portable backward on the same (out, lse).

    python bench/bwd_ws.py [--dims 64,128] [--seqs 1024,4096,16384] [--out DIR]

Backward FLOPs = 2.5 x the forward's 4·B·H·S²·D (halved causal), FlashAttention's convention. cuDNN's backward
is timed as one autograd backward of its SDPA forward (retain_graph), so it includes its own small
pre-/post-passes, as ours includes attn_bwd_pre, the dQ cast and the accumulator's zeroing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


# (column, backward() keywords over the base n_stages=2, dq_lag=False, dq_add=3, head dims it runs at): one knob at
# a time, then the FlashAttention-3 combination (stats in shared memory + early dQ + dQ-writer warp), and at D=64
# FlashAttention-3's 128-query step with dQ split by rows (3 stages / 128 rows do not fit shared memory at D=128)
_FA3 = dict(dq_writer=True, dq_early=True, stats_smem=True)
VARIANTS = [("ws_st2_tma", {}, (64, 128)), ("ws_st2_lag_tma", dict(dq_lag=True), (64, 128)),
            ("ws_st2_atomics", dict(dq_add=1), (64, 128)), ("ws_st2_nodq(diag)", dict(dq_add=0), (64, 128)),
            ("ws_st2_stats", dict(stats_smem=True), (64, 128)),
            ("ws_st2_early_stats", dict(dq_early=True, stats_smem=True), (64, 128)),
            ("ws_st2_writer_stats", dict(dq_writer=True, stats_smem=True), (64, 128)),
            ("ws_st2_writer_early_stats", _FA3, (64, 128)),
            ("ws_st3_writer_early_stats", dict(_FA3, n_stages=3), (64,)),
            ("ws_bm128_rows_stats", dict(block_m=128, dq_rows=True, stats_smem=True), (64,)),
            ("ws_bm128_rows_early_stats", dict(block_m=128, dq_rows=True, dq_early=True, stats_smem=True), (64,)),
            ("ws_bm128_rows_writer_early_stats", dict(_FA3, block_m=128, dq_rows=True), (64,)),
            ("ws_st2_alt_writer_early_stats", dict(_FA3, dq_alt=True), (64,))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqs", default="1024,4096,16384")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--stem", default="bwd_ws")
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    from fa3_inductor.kernels import hopper, hopper_bwd, triton_portable
    from fa3_inductor.kernels.program import ScoreProgram
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    rows, t0 = [], time.time()
    for d, s, causal in itertools.product([int(x) for x in args.dims.split(",")],
                                          [int(x) for x in args.seqs.split(",")], (False, True)):
        b, h = 16384 // s, 2048 // d
        gen = torch.Generator(device=dev).manual_seed(s + d)
        q, k, v, dout = (torch.randn(b, h, s, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(4))
        prog = ScoreProgram(("mul", ("score",), ("const", d ** -0.5)), causal="top_left" if causal else "none")
        out, lse = hopper.forward(q, k, v, [], prog)
        flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        row = {"D": d, "S": s, "causal": causal}
        ref = triton_portable.backward(dout, q, k, v, [], out, lse, prog)
        row["portable"] = do_bench(lambda: triton_portable.backward(dout, q, k, v, [], out, lse, prog))
        row["tuned"] = None
        hopper_bwd.backward(dout, q, k, v, [], out, lse, prog)      # tunes, then pinned
        row["tuned"] = do_bench(lambda: hopper_bwd.backward(dout, q, k, v, [], out, lse, prog))
        for name, kw, dims in VARIANTS:
            if d not in dims:
                continue
            kw = dict(dict(n_stages=2, dq_lag=False, dq_add=3), **kw)
            try:
                got = hopper_bwd.backward(dout, q, k, v, [], out, lse, prog, **kw)
                err = max(((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
                          for a, r in zip(got[:3], ref[:3]))
                row[name] = do_bench(lambda: hopper_bwd.backward(dout, q, k, v, [], out, lse, prog, **kw))
                row[name + "_err"] = err
            except Exception as e:   # a variant that does not build is reported, not fatal
                row[name] = None
                row[name + "_err"] = repr(e)[:120]
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        row["cudnn"] = do_bench(lambda: torch.autograd.grad(o, (qs, ks, vs), dout, retain_graph=True))
        row["tflops"] = {n: flops / (ms * 1e-3) / 1e12 for n, ms in row.items()
                         if isinstance(ms, float) and not n.endswith("_err")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    head = common.header("Backward only: warp-specialized variants vs portable vs cuDNN", dev)
    with open(os.path.join(args.out, args.stem + ".json"), "w") as f:
        json.dump({"header": head, "rows": rows, "elapsed_s": time.time() - t0}, f, indent=1)
    names = []
    for r in rows:      # columns in first-seen order (some variants run at one head dim)
        names += [n for n in r if n not in names and n not in ("D", "S", "causal", "tflops") and not n.endswith("_err")]
    lines = head + ["", "TFLOPS (ms); FLOPs = 2.5 x forward; err = max |ws - portable| / max |portable| over dq, dk, dv (the",
                    "nodq variant skips adding dQ, and the compiler then drops the dQ product too: 4 of the 5 GEMMs, a "
                    "diagnostic, its error is expected); tma: dQ added by TMA bulk reductions, atomics: per-thread "
                    "vector atomics; stats: lse / delta through shared memory; early: dQ issued between dV and dK; "
                    "writer: a dQ-writer warp issues the reductions; bm128_rows: 128 query rows per step, dQ split "
                    "by rows; alt: whole dQ tiles by the consumers in turn; -: not run at that head dim; tuned: "
                    "hopper_bwd.backward as dispatch runs it (its tuner's pick among CANDIDATES)",
             "", "| D | S | causal | " + " | ".join(names) + " | worst err |", "|---" * (4 + len(names)) + "|"]
    for r in rows:
        cells = [f"{r['tflops'][n]:.0f} ({r[n]:.2f})" if isinstance(r.get(n), float) else "err" if n in r else "-"
                 for n in names]
        errs = [r[n] for n in r if n.endswith("_err") and isinstance(r[n], float) and "nodq" not in n]
        lines.append(f"| {r['D']} | {r['S']} | {r['causal']} | " + " | ".join(cells)
                     + f" | {max(errs) if errs else float('nan'):.2g} |")
    with open(os.path.join(args.out, args.stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
