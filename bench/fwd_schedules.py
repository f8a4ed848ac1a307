"""Hopper 16-bit forward: schedule families against the default one, each candidate pinned.

    python bench/fwd_schedules.py [--families persistent,ksplit] [--program scale] [--out DIR] [--stem NAME]
                                  [--budget SECONDS] [--d 64,128,256] [--s 1024,...] [--causal 0,1]
                                  (one H100, < 4 minutes)

Grid (FA3 convention: 16k tokens, H·D = 2048, FLOPs 4·B·H·S²·D, halved if causal): D = 64 / 128 / 256,
S = 1k .. 16k, non-causal and causal (top-left), bf16 N(0, 1) inputs. Per cell, every candidate of a family is
timed pinned (triton.testing.do_bench, median) and the family's best reported: "default" is the best of
hopper.schedules' non-persistent candidates (what the tuner picks among today); "persistent" the same candidates on
persistent CTAs (templates_hopper PERSISTENT, grid min(#SMs, work tiles)); "ksplit" / "ksplit64" key-split key
blocks of 128 + 32 / 128 + 64 keys (templates_hopper BLOCK_N2, two stages, ping-pong or not; head dim 128 only);
"prefetch" / "nooverlap" the default's candidates with the score operand loaded ahead of each key block's S product
(PREFETCH) / with P·V waited before the softmax (OVERLAP=False): the operand schedules. --program: the score program
(scale: D^-0.5 alone; t5-bias: scores plus a dense (B, H, S, S) bf16 bias, T5's self-attention; keypad: a (B, 1, 1,
S) key-padding bool mask, a third of the last batch's keys hidden; dense-mask: a (B, 1, S, S) bool mask); with an
operand, SDPA with the same attn_mask (what Inductor runs for such a site) is timed in the same cell. Each output is
checked against the default's (max |diff|; NaN-poisoned output first, so a skipped work tile or key block shows).

Writes <stem>.json and <stem>.md under --out (default bench/results; stem default fwd_schedules; the persistent
comparison of session 6 is fwd_persist.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    ap.add_argument("--stem", default="fwd_schedules")
    ap.add_argument("--families", default="persistent,ksplit", help=f"besides default: of {list(FAMILIES)}")
    ap.add_argument("--program", default="scale", choices=list(PROGRAMS))
    ap.add_argument("--budget", type=float, default=210.0, help="seconds; later cells are skipped")
    ap.add_argument("--d", default="64,128,256")
    ap.add_argument("--s", default="1024,2048,4096,8192,16384")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    families = ["default"] + [f for f in args.families.split(",") if f and f != "default"]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}")

    import triton
    import triton.testing
    from fa3_inductor.kernels import hopper
    from fa3_inductor.kernels.program import ScoreProgram

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")

    t0 = time.time()
    cells, skipped = [], []
    sms = hopper.sm_count(torch.device("cuda"))
    for d in (int(x) for x in args.d.split(",")):
        h = 2048 // d
        for s in (int(x) for x in args.s.split(",")):
            b = max(1, args.tokens // s)
            gen = torch.Generator(device="cuda").manual_seed(d + s)
            q, k, v = (torch.randn(b, h, s, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
            for causal in (bool(int(x)) for x in args.causal.split(",")):
                if time.time() - t0 > args.budget:
                    skipped.append((d, s, causal))
                    continue
                prog, ops = PROGRAMS[args.program](ScoreProgram, d, b, h, s, "top_left" if causal else "none", gen)
                cell = {"D": d, "S": s, "B": b, "H": h, "causal": causal, "program": args.program,
                        "flops": 4 * b * h * s * s * d / (2 if causal else 1),
                        "work_tiles": b * h * -(-s // (2 * hopper.BLOCK_M)), "sms": sms, "runs": []}
                want = None
                for family in families:
                    for pin in FAMILIES[family](hopper, d):
                        rec = dict(pin, family=family)
                        try:
                            out = torch.full((b, h, s, d), float("nan"), device="cuda", dtype=q.dtype)
                            lse = torch.empty(b, h, s, device="cuda")
                            kern, grid, kargs, kw = hopper.launch_args(q, k, v, ops, prog, out, lse, **pin)
                            kern[grid](*kargs, **kw)
                            torch.cuda.synchronize()
                            if want is None:
                                want = out.clone()
                            rec.update(grid=list(grid), sep_o=bool(kw.get("SEP_O", False)),
                                       ms=bench(lambda: kern[grid](*kargs, **kw)),
                                       nan=bool(out.isnan().any()),
                                       max_diff=float((out.float() - want.float()).abs().max()))
                        except Exception as exc:    # a schedule that does not compile or launch is reported
                            rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        cell["runs"].append(rec)
                        print(d, s, causal, rec, flush=True)
                if ops:     # the peer Inductor runs for such a site: SDPA with the same mask / bias (causal merged in)
                    mask = ops[0]
                    if causal:
                        tri = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
                        mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
                    sd = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                        q, k, v, attn_mask=mask, is_causal=False, scale=1.0 if args.program == "t5-bias" else None)
                    try:
                        cell["sdpa_ms"] = bench(sd)
                    except Exception as exc:
                        cell["sdpa_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                cells.append(cell)
            del q, k, v
            torch.cuda.empty_cache()
    write(args.out, args.stem, families, cells, skipped, time.time() - t0, triton.__version__)
    return 0


def _plain(hopper, d, persistent=False):
    return [dict(pingpong=c.pingpong, stages=c.stages, persistent=persistent)
            for c in hopper.schedules(d, d, persistent=False)]


def _ksplit(n2):
    def pins(hopper, d):
        if hopper._tile_dim(d) != 128:
            return []
        return [dict(pingpong=pp, stages=2, persistent=False, block_n2=n2) for pp in (True, False)]
    return pins


# family -> the pinned launch keywords of its candidates at head dim d
FAMILIES = {
    "default": _plain,
    "persistent": lambda hopper, d: _plain(hopper, d, True),
    "ksplit": _ksplit(32),
    "ksplit64": _ksplit(64),
}


def _operand_pins(key):
    def pins(hopper, d):
        return [dict(p, **{key: key == "prefetch"}) for p in _plain(hopper, d)]
    return pins


def _scale_only(SP, d, b, h, s, causal, gen):
    return SP(("mul", ("score",), ("const", d ** -0.5)), causal=causal), []


def _t5_bias(SP, d, b, h, s, causal, gen):
    # per batch, as the zoo's T5 hands it over (its position bias with the padding mask added: (B, H, S, S))
    bias = torch.randn(b, h, s, s, device="cuda", generator=gen, dtype=torch.bfloat16)
    return SP(("add", ("score",), ("operand", 0)), n_operands=1, causal=causal), [bias]


def _bool_mask(dense: bool):
    """A (B, 1, S, S) mask, a fifth of it hidden at random (dense), or a (B, 1, 1, S) key padding hiding the last
    third of the last batch's keys."""
    def make(SP, d, b, h, s, causal, gen):
        if dense:
            keep = torch.rand(b, 1, s, s, device="cuda", generator=gen) > 0.2
        else:
            keep = torch.ones(b, 1, 1, s, dtype=torch.bool, device="cuda")
            keep[-1, ..., s - s // 3:] = False
        expr = ("where", ("operand", 0), ("mul", ("score",), ("const", d ** -0.5)), ("const", float("-inf")))
        return SP(expr, n_operands=1, causal=causal, empty_row="zero"), [keep]
    return make


# --program -> (ScoreProgram class, d, b, h, s, causal, generator) -> (program, operands)
PROGRAMS = {
    "scale": _scale_only,
    "t5-bias": _t5_bias,
    "keypad": _bool_mask(False),
    "dense-mask": _bool_mask(True),
}
FAMILIES.update({"prefetch": _operand_pins("prefetch"), "nooverlap": _operand_pins("overlap")})


def _best(cell, family):
    runs = [r for r in cell["runs"] if r["family"] == family and "ms" in r and not r["nan"]]
    return min(runs, key=lambda r: r["ms"]) if runs else None


def _name(r) -> str:
    return (f"{'pp' if r['pingpong'] else 'nopp'} st{r['stages']}" + (" sepO" if r.get("sep_o") else "")
            + (f" n2={r['block_n2']}" if r.get("block_n2") else ""))


def write(out_dir, stem, families, cells, skipped, elapsed, triton_version):
    tf = lambda fl, ms: fl / ms / 1e9  # noqa: E731
    others = families[1:]
    lines = [f"# Hopper forward: schedule families vs the default ({torch.cuda.get_device_name()}), "
             f"{datetime.date.today()}, commit {common.git_commit()}",
             f"torch {torch.__version__}, triton {triton_version}; bf16, 16k tokens, H·D = 2048; FA3 FLOP convention; "
             f"TFLOPS (ms), median of triton.testing.do_bench; best pinned candidate of each family; speedup: "
             f"default ms / family ms; elapsed {elapsed:.0f} s", "",
             "| D | S | causal | program | work tiles / SMs | default | " + " | ".join(f"{f} | speedup" for f in others)
             + " | SDPA (same mask / bias) | max abs diff vs default | errors / NaN |",
             "|---|---|---|---|---|---|" + "---|---|" * len(others) + "---|---|---|"]
    for c in cells:
        fl = c["flops"]
        dft = _best(c, "default")
        bad = [f"{r['family']} {_name(r)}: {r.get('error', 'NaN')}" for r in c["runs"] if "error" in r or r.get("nan")]
        cols = ["-" if dft is None else f"{tf(fl, dft['ms']):.0f} ({dft['ms']:.3g}, {_name(dft)})"]
        for f in others:
            r = _best(c, f)
            cols.append("-" if r is None else f"{tf(fl, r['ms']):.0f} ({r['ms']:.3g}, {_name(r)})")
            cols.append(f"{dft['ms'] / r['ms']:.3f}" if dft and r else "-")
        diff = max((r["max_diff"] for r in c["runs"] if r["family"] != "default" and "max_diff" in r),
                   default=float("nan"))
        sdpa = f"{tf(fl, c['sdpa_ms']):.0f} ({c['sdpa_ms']:.3g})" if "sdpa_ms" in c else c.get("sdpa_error", "-")
        lines.append(f"| {c['D']} | {c['S']} | {c['causal']} | {c.get('program', 'scale')} | {c['work_tiles']} / "
                     f"{c['sms']} | " + " | ".join(cols) + f" | {sdpa} | {diff:.3g} | {'; '.join(bad)} |")
    if skipped:
        lines += ["", f"Skipped (time budget): {skipped}"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump({"header": lines[:2], "families": families, "cells": cells, "skipped": skipped}, fh, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
