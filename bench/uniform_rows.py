"""Cost of the empty_row="uniform" gradient correction in the portable Triton backward. GPU only.

    python bench/uniform_rows.py [--iters 50]

Two sites, bf16: BERT-shaped (B=16, H=16, S=512, D=64, a (B, 1, 1, S) key padding mask, ~40% padding, no row
empty) and Llama-shaped (B=2, 16 query / 8 kv heads, S=4096, D=128, causal + key padding, batch row 1
left-padded by 700 tokens: 700 empty rows). Per site, milliseconds per backward call (GPU time between CUDA
events, and host wall time per call of back-to-back calls) for:
    zero        the same program with empty_row="zero" (no correction at all: the floor)
    uniform     tp.backward as it is now (attn_bwd_uniform, no host sync)
    reference   the floor plus reference.uniform_rows_grads and the adds, as the backward did before (its host
                sync included)
Prints a markdown table; "uniform" should sit within a few microseconds of "zero" on the BERT site.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from fa3_inductor.kernels import reference
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram


def site(name, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    if name == "bert":
        b, hq, hk, s, d, causal = 16, 16, 16, 512, 64, "none"
        keys = torch.rand(b, 1, 1, s, device=dev, generator=g) < 0.6
        keys[..., 0] = True
    else:
        b, hq, hk, s, d, causal = 2, 16, 8, 4096, 128, "top_left"
        keys = torch.ones(b, 1, 1, s, dtype=torch.bool, device=dev)
        keys[1, ..., :700] = False
    q = torch.randn(b, hq, s, d, device=dev, generator=g).bfloat16()
    k, v = (torch.randn(b, hk, s, d, device=dev, generator=g).bfloat16() for _ in range(2))
    prog = ScoreProgram(("where", ("operand", 0), ("mul", ("score",), ("const", d ** -0.5)), ("const", -math.inf)),
                        n_operands=1, causal=causal, empty_row="uniform")
    return prog, q, k, v, [keys]


def old_backward(dout, q, k, v, ops, out, lse, prog):
    zero = dataclasses.replace(prog, empty_row="zero")
    dq, dk, dv, _ = tp.backward(dout, q, k, v, ops, out, lse, zero)
    more = reference.uniform_rows_grads(dout, q, k, v, ops, prog, lse)
    if more is not None:
        dq, dk, dv = ((t.float() + m).to(t.dtype) for t, m in zip((dq, dk, dv), more[:3]))
    return dq, dk, dv


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / iters * 1e3
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    tp._AUTOTUNE = False
    print("| site | empty rows | variant | GPU ms / call | host ms / call |")
    print("|---|---|---|---|---|")
    for name in ("bert", "llama"):
        prog, q, k, v, ops = site(name, dev)
        out, lse = tp.forward(q, k, v, ops, prog)
        dout = torch.randn_like(out)
        empty = int(torch.isinf(lse).sum())
        zero = dataclasses.replace(prog, empty_row="zero")
        variants = {
            "zero": lambda: tp.backward(dout, q, k, v, ops, out, lse, zero),
            "uniform": lambda: tp.backward(dout, q, k, v, ops, out, lse, prog),
            "reference": lambda: old_backward(dout, q, k, v, ops, out, lse, prog),
        }
        for label, fn in variants.items():
            gpu, host = timed(fn, args.iters)
            print(f"| {name} | {empty} | {label} | {gpu:.3f} | {host:.3f} |")


if __name__ == "__main__":
    main()
