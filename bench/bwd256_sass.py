"""Cross-compile the D=256 backward candidates of bench/bwd256_sweep.py for sm_90a on a machine without a GPU
(tests/sm90_cross_compile.py: Triton's bundled ptxas) and tabulate what ptxas made of each: registers per
thread, local-memory (spill) instructions in all and inside loop bodies, HGMMA (wgmma) and HMMA (mma.sync)
instruction counts, shared memory. A candidate worth GPU time has no local-memory traffic in its loops and
fits the H100's 227 KB (232448 bytes) of shared memory per block.

    python bench/bwd256_sass.py [--out DIR]      # writes bwd256_sass.md / .json (default bench/results)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402

import bwd256_sweep as sweep  # noqa: E402
from fa3_inductor.kernels import triton_portable as tp  # noqa: E402
from fa3_inductor.kernels.program import ScoreProgram  # noqa: E402
from sm90_cross_compile import compile_triton_sm90, sass_facts  # noqa: E402

SMEM_LIMIT = 232448


def site(name: str, s: int = 1024) -> tp.BackwardLaunches:
    """The backward launches of a named site, built from CPU stand-ins (B, H, S, 256) bf16 (only shapes, strides
    and dtypes matter; without TRITON_INTERPRET the CUDA kernels are generated): "full" / "causal" (the bench's
    program), "gqa4-causal" (8 query heads on 2 kv heads), "pad+bias" (key padding and a bf16 bias, uniform
    empty rows), "softcap-causal" (Gemma-2's tanh soft-capping)."""
    hk = 2 if name == "gqa4-causal" else 8
    q = torch.zeros(2, 8, s, sweep.D, dtype=torch.bfloat16)
    k, v = (torch.zeros(2, hk, s, sweep.D, dtype=torch.bfloat16) for _ in range(2))
    ops = []
    scaled = ("mul", ("score",), ("const", sweep.D ** -0.5))
    if name in ("full", "causal", "gqa4-causal"):
        prog = sweep.program(name != "full")
    elif name == "pad+bias":
        ops = [torch.ones(2, 1, 1, s, dtype=torch.bool), torch.zeros(1, 8, s, s, dtype=torch.bfloat16)]
        prog = ScoreProgram(("where", ("operand", 0), ("add", scaled, ("operand", 1)), ("const", -math.inf)),
                            n_operands=2, causal="top_left", empty_row="uniform")
    else:
        prog = ScoreProgram(("mul", ("tanh", ("mul", ("score",), ("const", 0.02))), ("const", 30.0)),
                            causal="top_left")
    lse = torch.zeros(2, 8, s)
    return tp.BackwardLaunches(q, q, k, v, ops, lse, prog, q)


def facts(kind: str, cfg, site_name: str) -> dict:
    run = site(site_name)
    kernel, _, args, kwargs = run.dkdv_call(cfg) if kind == "dkdv" else run.dq_call(cfg)
    return sass_facts(compile_triton_sm90(kernel, *args, **kwargs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "bench", "results"))
    args = ap.parse_args(argv)
    tuned = {"dkdv": tp._dkdv_configs(sweep.D, torch.bfloat16), "dq": tp._dq_configs(sweep.D, torch.bfloat16)}
    jobs = [(kind, cfg, name) for kind, cfgs in (("dkdv", sweep.DKDV), ("dq", sweep.DQ)) for cfg in cfgs
            for name in ("full", "causal")]
    jobs += [(kind, cfg, name) for name in ("gqa4-causal", "pad+bias", "softcap-causal") for kind in ("dkdv", "dq")
             for cfg in tuned[kind]]
    rows = []
    for kind, cfg, name in jobs:
        t0 = time.time()
        try:
            f = facts(kind, cfg, name)
        except Exception as exc:
            f = {"error": repr(exc)[:200]}
        row = {"kind": kind, "config": list(cfg), "site": name, "tuner": tuple(cfg) in tuned[kind], **f}
        rows.append(row)
        print(row, f"{time.time() - t0:.0f} s", flush=True)
    lines = ["# D=256 backward candidates compiled for sm_90a (bench/bwd256_sass.py)", "",
             "bf16; sites: full / causal = the bench's scale-only program (B, 8, S, 256); then the tuner's lists on "
             "gqa4-causal (8 query heads on 2 kv heads), pad+bias (key padding, a bias operand, uniform empty rows), "
             "softcap-causal (tanh soft-capping). `inner-loop local` = LDL/STL inside innermost loop bodies (paid "
             f"per tile); shared in bytes (limit {SMEM_LIMIT}); tuner = in triton_portable's D=256 list. dkdv "
             "config: (BLOCK_M queries, BLOCK_N keys, warps, stages[, DV_BLOCK_M]); dq: (BLOCK_M queries, "
             "BLOCK_N keys, warps, stages).", "",
             "| kernel | config | site | regs | local ops | inner-loop local | HGMMA | HMMA | shared | fits | tuner |",
             "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {tuple(r['config'])} | {r['site']} | error: {r['error']} |")
            continue
        fits = "yes" if r["shared"] <= SMEM_LIMIT else "no"
        lines.append(f"| {r['kind']} | {tuple(r['config'])} | {r['site']} | {r['regs']} | {r['local_ops']} "
                     f"| {r['loop_local_ops']} | {r['hgmma']} | {r['hmma']} | {r['shared']} | {fits} "
                     f"| {'yes' if r['tuner'] else ''} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bwd256_sass.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "bwd256_sass.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
