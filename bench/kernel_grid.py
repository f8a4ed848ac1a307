"""Attention kernel benchmark: our kernels (`ours` = what dispatch picks: the Hopper warp-specialized forward on
sm_90; `portable` = the portable Triton kernels) beside cuDNN, FlashAttention-2 (both through SDPA),
FlexAttention and FlashAttention-3 (through JAX, the wheel flash-attn3-jax, module `flash_attn3_jax`, when carried), on the FA3 paper's grid
(16k tokens, B = 16384 / S, H = 2048 / D, bf16), plus the HF Llama masked form against Inductor.

    python bench/kernel_grid.py [--quick] [--grid pass=fwd,D=128,S=4096,causal=1] [--out DIR] [--budget SECONDS]

Every point first checks our output (and gradients, for fwd+bwd) against SDPA and prints the max error.
Writes kernels.json, kernels.md and kernels.png under --out (default bench/results) and prints a short table.
Timing: triton.testing.do_bench median (FA3-JAX: wall clock over 30 calls after block_until_ready).
FLOPs: 4·B·H·S²·D, halved when causal; fwd+bwd counts 3.5x the forward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # JAX must not grab the GPU's memory

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fa3_inductor must be the installed package: the source tree maps kernels/ and patterns/ into it.

from fa3_inductor import dispatch  # noqa: E402
from fa3_inductor.kernels import triton_portable as tp  # noqa: E402
from fa3_inductor.kernels.program import ScoreProgram  # noqa: E402

PASSES = ("fwd", "fwd+bwd")
DIMS = (64, 128, 256)
SEQS = (1024, 4096, 16384)
# FlexAttention compiles per shape (tens of seconds each), so by default only at D=128, S=4096.
FLEX_POINTS = {("fwd", 128, 4096), ("fwd+bwd", 128, 4096)}   # --flex-all for every point


def git_commit() -> str:
    if os.environ.get("FA3_COMMIT"):      # the device gets the tree without .git: the caller names the commit
        return os.environ["FA3_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def parse_grid(text: str | None):
    """'pass=fwd,D=128|256,S=4096,causal=1' -> filters; several filters separated by ';' are OR-ed."""
    if not text:
        return []
    norm = {"true": "1", "false": "0", "yes": "1", "no": "0"}
    out = []
    for part in text.split(";"):
        f = {}
        for kv in part.split(","):
            if kv.strip():
                key, val = kv.split("=")
                f[key.strip()] = {norm.get(x.strip().lower(), x.strip()) for x in val.split("|")}
        out.append(f)
    return out


def keep(point, filters) -> bool:
    if not filters:
        return True
    vals = {"pass": point["pass"], "D": str(point["D"]), "S": str(point["S"]), "causal": str(int(point["causal"]))}
    return any(all(vals.get(k) in v for k, v in f.items()) for f in filters)


def grid(quick: bool):
    pts = []
    for p in PASSES:
        for d in DIMS:
            for s in SEQS:
                for causal in (False, True):
                    pts.append({"pass": p, "D": d, "S": s, "causal": causal})
    if quick:
        pts = [x for x in pts if x["S"] == 4096 and (x["pass"] == "fwd" or x["D"] == 128)]
    return pts


def flops(b, h, s, d, causal, pas):
    f = 4.0 * b * h * s * s * d
    if causal:
        f /= 2
    return f * (3.5 if pas == "fwd+bwd" else 1.0)


def bench_ms(fn, grads=None):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


# --- implementations -----------------------------------------------------------------------------------

def ours_fns(q, k, v, dout, causal, entry=None):
    """Forward / forward+backward of a dispatch entry (default: the one dispatch picks for this point)."""
    prog = ScoreProgram(("mul", ("score",), ("const", q.shape[-1] ** -0.5)),
                        causal="top_left" if causal else "none")
    if entry is None:
        entry, _ = dispatch.select(prog, q, k, v, [])

    def fwd():
        return entry.forward(q, k, v, [], prog)

    def fwdbwd():
        out, lse = entry.forward(q, k, v, [], prog)
        return entry.backward(dout, q, k, v, [], out, lse, prog)
    return fwd, fwdbwd


def sdpa_fns(q, k, v, dout, causal, backend):
    from torch.nn.attention import sdpa_kernel
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd():
        with sdpa_kernel(backend), torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwdbwd():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        out.backward(dout)
    return fwd, fwdbwd, [qg, kg, vg]


_FLEX = {}


def flex_fns(q, k, v, dout, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    fa = _FLEX["fn"]
    s = q.shape[2]
    bm = None
    if causal:
        bm = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, s, s, device=q.device)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            return fa(q, k, v, block_mask=bm)

    def fwdbwd():
        fa(qg, kg, vg, block_mask=bm).backward(dout)
    return fwd, fwdbwd, [qg, kg, vg]


def fa3_jax_time(b, h, s, d, causal, pas, calls=30):
    import jax
    import jax.numpy as jnp
    from flash_attn3_jax import flash_mha
    key = jax.random.PRNGKey(0)
    kq, kk, kv, kd = jax.random.split(key, 4)
    shape = (b, s, h, d)
    q, k, v, do = (jax.random.normal(x, shape, dtype=jnp.float32).astype(jnp.bfloat16) for x in (kq, kk, kv, kd))
    scale = d ** -0.5
    if pas == "fwd":
        f = jax.jit(lambda q, k, v: flash_mha(q, k, v, softmax_scale=scale, is_causal=causal))
    else:
        def loss(q, k, v):
            return (flash_mha(q, k, v, softmax_scale=scale, is_causal=causal).astype(jnp.float32)
                    * do.astype(jnp.float32)).sum()
        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(f(q, k, v))
    jax.block_until_ready(f(q, k, v))
    t0 = time.perf_counter()
    for _ in range(calls):
        r = f(q, k, v)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / calls * 1e3


def fa3_available() -> bool:
    # JAX would otherwise take 75% of the GPU's memory up front, beside PyTorch's own pool
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import flash_attn3_jax  # noqa: F401  (the wheel flash-attn3-jax installs this module)
        return True
    except Exception as exc:
        print(f"flash_attn3_jax not importable: {exc!r}"[:400])
        return False


# --- correctness ---------------------------------------------------------------------------------------

def check_point(q, k, v, dout, causal, pas):
    """Max abs error of ours vs SDPA (default backend) for out (and dq, dk, dv)."""
    fwd, fwdbwd = ours_fns(q, k, v, dout, causal)
    out, lse = fwd()
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
    errs = {"out": (out.float() - ref.float()).abs().max().item()}
    if pas == "fwd+bwd":
        ref.backward(dout)
        prog = ScoreProgram(("mul", ("score",), ("const", q.shape[-1] ** -0.5)),
                            causal="top_left" if causal else "none")
        entry, _ = dispatch.select(prog, q, k, v, [])
        dq, dk, dv, _ = entry.backward(dout, q, k, v, [], out, lse, prog)
        for name, a, r in (("dq", dq, qg.grad), ("dk", dk, kg.grad), ("dv", dv, vg.grad)):
            errs[name] = (a.float() - r.float()).abs().max().item()
    return errs


# --- the masked HF Llama form --------------------------------------------------------------------------

def llama_masked(results, budget_left):
    b, h, s, d = 4, 16, 4096, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    lo = torch.finfo(torch.bfloat16).min
    mask = torch.triu(torch.full((s, s), lo, device="cuda"), 1).to(torch.bfloat16).expand(b, 1, s, s).contiguous()
    scaling = d ** -0.5

    def eager(q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * scaling
        w = w + mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)

    prog = ScoreProgram(("add", ("mul", ("score",), ("const", scaling)), ("operand", 0)), n_operands=1)
    f = flops(b, h, s, d, False, "fwd")
    row = {"pass": "fwd", "D": d, "S": s, "causal": "mask", "B": b, "H": h, "form": "llama-masked"}
    try:
        entry, _ = dispatch.select(prog, q, k, v, [mask])
        out, _ = entry.forward(q, k, v, [mask], prog)
        ref = eager(q, k, v, mask)
        err = (out.float() - ref.float()).abs().max().item()
        print(f"llama-masked ({entry.name}): max |ours - eager| = {err:.3g}")
        ms = bench_ms(lambda: entry.forward(q, k, v, [mask], prog))
        results.append({**row, "impl": "ours", "ms": ms, "tflops": f / ms / 1e9, "max_err": err})
    except Exception as exc:
        traceback.print_exc()
        results.append({**row, "impl": "ours", "error": repr(exc)[:200]})
    if budget_left() > 0:
        try:
            comp = torch.compile(eager)
            comp(q, k, v, mask)
            ms = bench_ms(lambda: comp(q, k, v, mask))
            results.append({**row, "impl": "inductor", "ms": ms, "tflops": f / ms / 1e9})
        except Exception as exc:
            traceback.print_exc()
            results.append({**row, "impl": "inductor", "error": repr(exc)[:200]})


# --- output ----------------------------------------------------------------------------------------------

IMPLS = ("ours", "portable", "cudnn", "fa2", "flex", "fa3-jax", "inductor")
PEERS = ("cudnn", "fa2", "flex", "fa3-jax")
MATMUL_CEILING = 772.0       # bf16 8192^3 matmul on this H100 (ANCHORS.md)


def table(results, header_lines):
    keyf = lambda r: (r["pass"], r["D"], r["S"], str(r["causal"]))
    rows = {}
    for r in results:
        rows.setdefault(keyf(r), {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(i in v for v in rows.values())]
    lines = list(header_lines) + ["", "TFLOPS (ms in parentheses); '-' not run, 'err' failed", "",
                                  "| pass | D | S | causal | " + " | ".join(impls)
                                  + " | ours/best peer | ours/cudnn | ours/fa3 | ours % of matmul |",
                                  "|" + "---|" * (len(impls) + 8)]
    for key in sorted(rows, key=lambda k: (PASSES.index(k[0]) if k[0] in PASSES else 9, k[1], k[2], k[3])):
        cells = []
        for i in impls:
            r = rows[key].get(i)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("err")
            else:
                cells.append(f"{r['tflops']:.0f} ({r['ms']:.3g})")
        o = rows[key].get("ours")
        ok = o is not None and "tflops" in o

        def ratio(names):
            vals = [rows[key][n]["tflops"] for n in names if n in rows[key] and "tflops" in rows[key][n]]
            return f"{o['tflops'] / max(vals):.2f}" if ok and vals else "-"
        frac = f"{100 * o['tflops'] / MATMUL_CEILING:.0f}%" if ok else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells)
                     + f" | {ratio(PEERS)} | {ratio(['cudnn'])} | {ratio(['fa3-jax'])} | {frac} |")
    return lines


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"no plot: {exc}")
        return
    fig, axes = plt.subplots(2, 1, figsize=(16, 9))
    for ax, pas in zip(axes, PASSES):
        pts = sorted({(r["D"], r["S"], str(r["causal"])) for r in results if r["pass"] == pas and "tflops" in r})
        impls = [i for i in IMPLS if any(r["impl"] == i and r["pass"] == pas and "tflops" in r for r in results)]
        width = 0.8 / max(1, len(impls))
        for n, impl in enumerate(impls):
            ys = []
            for p in pts:
                hit = [r for r in results if r["pass"] == pas and r["impl"] == impl and "tflops" in r
                       and (r["D"], r["S"], str(r["causal"])) == p]
                ys.append(hit[0]["tflops"] if hit else 0)
            ax.bar([x + n * width for x in range(len(pts))], ys, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(pts))])
        ax.set_xticklabels([f"D{d}\nS{s // 1024}k\n{'c' if c == 'True' else ('m' if c == 'mask' else 'nc')}"
                            for d, s, c in pts], fontsize=7)
        ax.set_ylabel("TFLOPS")
        ax.set_title(pas)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# --- main ------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="S=4096 only; fwd+bwd at D=128 only")
    ap.add_argument("--grid", default=None, help="filters, e.g. 'pass=fwd,D=128|256;S=1024' (OR between ';')")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; peers are skipped past it")
    ap.add_argument("--flex-all", action="store_true", help="FlexAttention at every point (slow compiles)")
    ap.add_argument("--no-llama", action="store_true", help="skip the masked HF Llama form")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is required")
        return 1
    import triton
    t_start = time.time()
    budget_left = lambda: args.budget - (time.time() - t_start)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    header = [f"# Attention kernels, {datetime.datetime.now().isoformat(timespec='seconds')}",
              f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; commit {git_commit()}"]
    print("\n".join(header))
    from torch.nn.attention import SDPBackend
    have_fa3 = fa3_available()
    print(f"FA3 via JAX: {'yes' if have_fa3 else 'not importable'}")
    probe = torch.empty(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
    picked, _ = dispatch.select(ScoreProgram(("mul", ("score",), ("const", 0.1))), probe, probe, probe, [])
    header.append(f"ours = dispatch's pick ({picked.name} forward, its backward); portable = the portable Triton "
                  f"kernels; FA3 = flash-attn3-jax {'(carried)' if have_fa3 else '(not available)'}")
    filters = parse_grid(args.grid)
    points = [p for p in grid(args.quick) if keep(p, filters)]
    results = []
    for p in points:
        pas, d, s, causal = p["pass"], p["D"], p["S"], p["causal"]
        b, h = 16384 // s, 2048 // d
        row = {"pass": pas, "D": d, "S": s, "causal": causal, "B": b, "H": h}
        f = flops(b, h, s, d, causal, pas)
        torch.manual_seed(0)
        q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        tag = f"{pas:7s} D={d:3d} S={s:5d} causal={int(causal)}"
        try:
            errs = check_point(q, k, v, dout, causal, pas)
            print(f"{tag}: max error vs SDPA " + ", ".join(f"{n} {e:.3g}" for n, e in errs.items()))
        except Exception as exc:
            traceback.print_exc()
            errs = {"error": repr(exc)[:200]}
        peers = [("ours", lambda: ours_fns(q, k, v, dout, causal), None),
                 ("portable", lambda: ours_fns(q, k, v, dout, causal, dispatch.TRITON), None)]
        if budget_left() > 0:
            peers += [("cudnn", lambda: sdpa_fns(q, k, v, dout, causal, SDPBackend.CUDNN_ATTENTION), None),
                      ("fa2", lambda: sdpa_fns(q, k, v, dout, causal, SDPBackend.FLASH_ATTENTION), None)]
            if args.flex_all or (pas, d, s) in FLEX_POINTS:
                peers.append(("flex", lambda: flex_fns(q, k, v, dout, causal), None))
        for name, make, _ in peers:
            try:
                fns = make()
                fn = fns[0] if pas == "fwd" else fns[1]
                grads = fns[2] if len(fns) > 2 and pas != "fwd" else None
                fn()
                ms = bench_ms(fn, grads)
                rec = {**row, "impl": name, "ms": ms, "tflops": f / ms / 1e9}
                if name == "ours":
                    rec["max_err_vs_sdpa"] = errs
                results.append(rec)
                print(f"{tag}: {name:6s} {ms:8.3f} ms {f / ms / 1e9:7.1f} TFLOPS")
            except Exception as exc:
                print(f"{tag}: {name} failed: {repr(exc)[:300]}")
                results.append({**row, "impl": name, "error": repr(exc)[:300]})
        if have_fa3 and d == 128 and budget_left() > 0:
            try:
                ms = fa3_jax_time(b, h, s, d, causal, pas)
                results.append({**row, "impl": "fa3-jax", "ms": ms, "tflops": f / ms / 1e9})
                print(f"{tag}: fa3-jax {ms:8.3f} ms {f / ms / 1e9:7.1f} TFLOPS")
            except Exception as exc:
                print(f"{tag}: fa3-jax failed: {repr(exc)[:300]}")
                results.append({**row, "impl": "fa3-jax", "error": repr(exc)[:300]})
        del q, k, v, dout
        torch.cuda.empty_cache()
    if not args.no_llama:
        llama_masked(results, budget_left)
    elapsed = time.time() - t_start
    header.append(f"elapsed {elapsed:.0f} s; tuned configs: {len(tp._TUNED)}")
    with open(os.path.join(args.out, "kernels.json"), "w") as fh:
        json.dump({"header": header, "results": results,
                   "tuned": {repr(k): v for k, v in tp._TUNED.items()}}, fh, indent=1, default=str)
    lines = table(results, header)
    with open(os.path.join(args.out, "kernels.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(results, os.path.join(args.out, "kernels.png"))
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
