"""What the Hopper forward compiles to, per schedule variant, without a GPU: Triton's bundled ptxas for sm_90a
(tests/sm90_cross_compile.py), then the cubin's facts and the instruction mix of one key tile of consumer 0's
main loop (unmasked path: what every tile but the masked ones costs each thread).

    python bench/fp8_sass.py [--out DIR]        (CPU only, about a minute; writes fp8_sass.md / .json)

Columns: registers at launch (the consumers run at setmaxnreg 240), local-memory instructions (spills) in the
whole kernel and in one loop trip, tensor-core MMAs in the kernel (QGMMA: e4m3, HGMMA: 16-bit), shared
memory, instructions per loop trip and per 128 keys, then the softmax (MUFU = exp2, FFMA, FMUL, FMNMX) and
the P conversion (F2FP: cvt pairs, PRMT: byte permutes, SHFL: lane shuffles, LOP3 + SHF, LDS/STS + LDSM/STSM:
shared memory) per trip, and bench/sass_model.py's cycles: one warp's trip alone ("trip cyc": what ping-pong
pays per warpgroup and tile) and per tile pair with both consumers' warps on one sub-partition ("pair cyc": the
schedule without ping-pong; the measured 877 TFLOPS of the D=128 nopp default is ~2200 cycles per pair at
1.755 GHz against 2005 here). Scale-only programs (scale = D^-0.5), 2 x 4 heads x 1024 keys.

Second table: the quantize pass's kernels per 128-row tile of bf16 input (tile kernel: rows rotated, V transposed
in wgmma_key_order; general kernel: the butterfly path), with their global loads / stores by width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from sm90_cross_compile import compile_sm90, compile_triton_sm90, main_loop_mix, sass_facts, sass_text  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_model  # noqa: E402

from fa3_inductor.kernels import hopper  # noqa: E402
from fa3_inductor.kernels.fp8_quant import Fp8Operand  # noqa: E402
from fa3_inductor.kernels.program import ScoreProgram  # noqa: E402

# (dtype, D, causal, variant kwargs); {} is the default schedule
VARIANTS = [
    ("bf16", 128, False, {}), ("bf16", 256, False, {"pingpong": False, "stages": 2}),
    # key-split key blocks (templates_hopper BLOCK_N2): 128 + 32 / 128 + 64 keys per block at D=128
    ("bf16", 128, False, {"block_n2": 32, "stages": 2}), ("bf16", 128, False, {"block_n2": 64, "stages": 2}),
    ("fp8", 64, False, {}),
    ("fp8", 128, False, {}), ("fp8", 128, True, {}),
    ("fp8", 128, False, {"block_n": 256, "pingpong": True}),
    ("fp8", 128, False, {"block_n": 256, "pingpong": False, "overlap": False}),
    ("fp8", 256, False, {}), ("fp8", 256, True, {}),
    ("fp8", 256, False, {"block_n": 128, "pingpong": True}),
    ("fp8", 256, False, {"block_n": 128, "pingpong": True, "overlap": False}),
    ("fp8", 256, False, {"block_n": 64, "pingpong": False}),
    ("fp8", 256, False, {"block_n": 64, "pingpong": True}),
    # softmax knobs (hopper.Fp8Schedule) at D=128, 128-key tiles
    ("fp8", 128, False, {"pingpong": False}),
    ("fp8", 128, False, {"pingpong": False, "tree": True}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "emu": 2}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "emu": 1}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "emu": 2}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "emu": 3}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "late": True, "emu": 2}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "late": True, "emu": 3}),
    ("fp8", 128, False, {"pingpong": False, "join": True}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "join": True}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "join": True, "emu": 1}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "join": True, "emu": 3}),
    ("fp8", 128, False, {"pingpong": False, "tree": True, "lsum": True, "mid": True, "emu": 1}),
    ("fp8", 128, False, {"pingpong": True, "tree": True, "lsum": True, "join": True, "emu": 1}),
    ("fp8", 128, False, {"pingpong": True, "tree": True, "lsum": True, "late": True, "emu": 2}),
    ("fp8", 128, False, {"pingpong": True, "tree": True, "lsum": True, "emu": 2}),
    ("fp8", 128, True, {"pingpong": False, "tree": True, "lsum": True, "late": True, "emu": 2}),
    ("fp8", 64, False, {"pingpong": True, "tree": True, "lsum": True, "late": True, "emu": 2}),
    ("fp8", 256, False, {"pingpong": False, "tree": True}),
]


def compile_variant(dtype: str, d: int, causal: bool, kw: dict):
    b, h, s = 2, 4, 1024
    prog = ScoreProgram(("mul", ("score",), ("const", d ** -0.5)), causal="top_left" if causal else "none")
    out, lse = torch.empty(b, h, s, d, dtype=torch.bfloat16), torch.empty(b, h, s)
    if dtype == "bf16":
        x = torch.randn(b, h, s, d).to(torch.bfloat16)
        kernel, grid, args, kwargs = hopper.launch_args(x, x, x, [], prog, out, lse, **kw)
        return compile_sm90(kernel, *args, **kwargs), kwargs
    from fa3_inductor.kernels.templates_hopper import fp8_quant_blocks
    bn = hopper.fp8_config(d, d, kw.get("block_n"))[0]
    qb, kvb = fp8_quant_blocks(bn)

    def op(shape, block, transposed=False):
        return Fp8Operand(torch.randn(*shape).to(torch.float8_e4m3fn), torch.ones(b, h, s // block), block,
                          transposed, False, transposed, s)
    q8, k8, v8 = op((b, h, s, d), qb), op((b, h, s, d), kvb), op((b, h, d, s), kvb, True)
    kernel, grid, args, kwargs = hopper.fp8_launch_args(q8, k8, v8, [], prog, out, lse, **kw)
    return compile_sm90(kernel, *args, **kwargs), kwargs


def row(dtype, d, causal, kw) -> dict:
    compiled, kwargs = compile_variant(dtype, d, causal, kw)
    facts = sass_facts(compiled)
    sass = sass_text(compiled)
    mix = main_loop_mix(sass) or {}
    bn = kwargs["BLOCK_N"] + kwargs.get("BLOCK_N2", 0)      # keys per key block (one loop trip)
    soft = "".join(f" {k}" for k in ("tree", "lsum", "late", "join", "mid") if kwargs.get(k.upper()))
    soft += f" emu{kwargs['EMU']}" if kwargs.get("EMU") else ""
    keys = f"{kwargs['BLOCK_N']}+{kwargs['BLOCK_N2']}" if kwargs.get("BLOCK_N2") else f"{bn}"
    name = (f"{dtype} D{d}{' causal' if causal else ''} N{keys} {'pp' if kwargs['PINGPONG'] else 'nopp'} "
            f"st{kwargs['STAGES']}{'' if kwargs.get('OVERLAP', True) else ' no-overlap'}{soft}"
            f"{' (default)' if not kw else ''}")
    g = mix.get
    return {"variant": name, **facts, "loop_local": g("local", 0), "loop": g("total", 0),
            "per128": round(g("total", 0) * 128 / bn), "MUFU": g("MUFU", 0), "FFMA": g("FFMA", 0),
            "FMUL": g("FMUL", 0), "FMNMX": g("FMNMX", 0), "F2FP": g("F2FP", 0), "PRMT": g("PRMT", 0),
            "SHFL": g("SHFL", 0), "LOP3+SHF": g("LOP3", 0) + g("SHF", 0),
            "smem": g("LDS", 0) + g("STS", 0) + g("LDSM", 0) + g("STSM", 0), "FADD": g("FADD", 0),
            "trip cyc": sass_model.loop_trip_cycles(sass), "pair cyc": sass_model.loop_shared_cycles(sass)}


def quant_row(kernel: str, d: int, rotate: bool, transposed: bool, block: int = 128) -> dict:
    from fa3_inductor.kernels import fp8_quant
    from fa3_inductor.kernels import fp8_quant_kernel as qk
    from fa3_inductor.kernels.fp8_recipe import signed_hadamard
    b, h, s = 2, 4, 1024
    x = torch.randn(b, h, s, d, dtype=torch.bfloat16)
    buf = torch.empty(b, h, d, s, dtype=torch.float8_e4m3fn) if transposed else \
        torch.empty(b, h, s, d, dtype=torch.float8_e4m3fn)
    ys = (buf.stride(0), buf.stride(1), buf.stride(3), buf.stride(2)) if transposed else buf.stride()
    sc = torch.empty(b, h, s // block)
    if kernel == "tile":
        warps = fp8_quant._tile_warps(block, d)
        c = compile_triton_sm90(qk.quantize_tile_kernel, x, buf, sc, signed_hadamard(0, d, torch.bfloat16),
                                *x.stride(), *ys, *sc.stride(), s, s, d, d, 1 / math.sqrt(d), BLOCK=block, BD=d,
                                ROTATE=rotate, EXACT=False, WGMMA_KEYS=transposed, num_warps=warps)
    else:
        chunk = fp8_quant._chunk(block, d, False)
        warps = max(4, min(16, chunk * d // 1024))
        c = compile_triton_sm90(qk.quantize_kernel, x, buf, sc, sc, sc, *x.stride(), *ys, *sc.stride(), s, s, d, d,
                                1 / math.sqrt(d), BLOCK=block, CHUNK=chunk, BD=d, LOG_BD=d.bit_length() - 1,
                                ROTATE=rotate, MODE=0, EXACT=False, WGMMA_KEYS=transposed, num_warps=warps)
    sass = sass_text(c)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M)
    count = lambda *names: sum(o.split(".")[0] in names for o in ops)  # noqa: E731
    return {"kernel": f"{kernel} D{d} {'rotated rows' if rotate else 'V transposed'}", "warps": warps,
            **sass_facts(c), "instrs": len(ops), "LDG.128": sum(o.startswith("LDG.E.128") for o in ops),
            "STG.128": sum(o.startswith("STG.E.128") for o in ops),
            "STG.U8": sum(o.startswith("STG.E.U8") for o in ops),
            "SHFL": count("SHFL"), "BAR": count("BAR"), "LDS/STS": count("LDS", "STS", "LDSM", "STSM")}


QCOLS = ["kernel", "warps", "regs", "local_ops", "hgmma", "shared", "instrs", "LDG.128", "STG.128", "STG.U8", "SHFL",
         "BAR", "LDS/STS"]
COLS = ["variant", "regs", "local_ops", "loop_local", "qgmma", "hgmma", "shared", "loop", "per128", "MUFU", "FFMA",
        "FADD", "FMUL", "FMNMX", "F2FP", "PRMT", "SHFL", "LOP3+SHF", "smem", "trip cyc", "pair cyc"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    rows = []
    for v in VARIANTS:
        rows.append(row(*v))
        print(rows[-1], flush=True)
    qrows = [quant_row(kern, d, rot, not rot)
             for kern in ("tile", "general") for d in (128, 256) for rot in (True, False)]
    import datetime
    import triton
    from common import git_commit
    lines = ["# Hopper forward cross-compiled for sm_90a: cubin facts and one main-loop trip (consumer 0, unmasked)",
             f"{datetime.date.today()}, commit {git_commit()}; CPU, Triton {triton.__version__}'s bundled ptxas (no GPU)",
             "", "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLS) + " |" for r in rows]
    lines += ["", "## Quantize kernels (one 128-row tile of bf16 per program)", "",
              "| " + " | ".join(QCOLS) + " |", "|" + "---|" * len(QCOLS)]
    lines += ["| " + " | ".join(str(r[c]) for c in QCOLS) + " |" for r in qrows]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_sass.json"), "w") as fh:
        json.dump({"forward": rows, "quantize": qrows}, fh, indent=1)
    with open(os.path.join(args.out, "fp8_sass.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
