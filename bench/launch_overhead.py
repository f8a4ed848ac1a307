"""Host cost of one attention call, piece by piece (issue 6: the S=512 prefill and eager-mode decode are
CPU-bound on it). GPU only.

    python bench/launch_overhead.py [--out DIR] [--calls 300]

The sites are the real ones: the ANCHORS Llama (S=512 prefill, and one decode step against a 4352-long
StaticCache) is compiled with backend="fa3", and the first run-time dispatch of each records the op's
arguments. Per site, microseconds of host time per call (wall time of `calls` back-to-back calls, no sync
inside; the kernels are shorter than the host work, so the GPU never pushes back) for: cuDNN SDPA on the same
q, k, v (the peer's host cost), the whole op (torch.ops.fa3.attention), the chosen kernel module's forward
called directly, and its pieces (dispatch.select, the launch arguments, the bare kernel launch). Writes
launch_overhead.json / .md under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def capture_sites(device) -> dict:
    """{site name: (prog, q, k, v, operands)} from the first dispatch of a prefill and of a decode step."""
    import generate
    from fa3_inductor import dispatch
    seen = []
    orig = dispatch.select

    def spy(prog, q, k, v, operands, *a, **kw):
        if not isinstance(q, torch._subclasses.FakeTensor) and q.device.type == "cuda":
            seen.append((prog, q.clone(), k.clone(), v.clone(), [t.clone() for t in operands]))
        return orig(prog, q, k, v, operands, *a, **kw)

    dispatch.select = spy
    # the op's own cost is what is measured here: every site rewritten, no measured choice (site_choice.py)
    os.environ["FA3_MEASURE_SITES"] = "0"
    try:
        model = generate.llama("sdpa", True, device, torch.bfloat16)
        ids = torch.randint(1, 32000, (2, 512), device=device, generator=torch.Generator(device).manual_seed(0))
        common.reset_dynamo()
        with torch.no_grad():
            torch.compile(model, backend="fa3")(input_ids=ids, attention_mask=torch.ones_like(ids))
        prefill = seen[0]
        seen.clear()
        gen = generate.Generator(model, ids[:1, :256].repeat(1, 17), ("fa3", "sdpa", "static", None), 4352, 2)
        gen(2)
        gen.close()
        decode = next(s for s in seen if s[1].shape[2] == 1)
    finally:
        dispatch.select = orig
    return {"prefill B2 S512": prefill, "decode Sk4352": decode}


def per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / calls * 1e6


def pieces(prog, q, k, v, operands):
    """(name, callable) of the chosen entry's parts, for the kernel modules that expose launch_args."""
    from fa3_inductor import dispatch
    from fa3_inductor.kernels import hopper, triton_decode
    entry, _ = dispatch.select(prog, q, k, v, operands)
    out = [("dispatch.select", lambda: dispatch.select(prog, q, k, v, operands)),
           (f"{entry.name}.forward", lambda: entry.forward(q, k, v, operands, prog))]
    if entry.name == "hopper":
        b, hq, sq, _ = q.shape
        o = torch.empty(b, hq, sq, v.shape[-1], dtype=v.dtype, device=q.device)
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
        d, dv = q.shape[-1], v.shape[-1]
        bn = hopper.config(d, dv)[0]
        out.append(("hopper.tile_args", lambda: hopper.tile_args(q, k, operands, prog, bn)))
        tiles = hopper.tile_args(q, k, operands, prog, bn)
        out.append(("hopper.launch_args", lambda: hopper.launch_args(q, k, v, operands, prog, o, lse, tiles=tiles)))
        kern, grid, args, kw = hopper.launch_args(q, k, v, operands, prog, o, lse, tiles=tiles)
        out.append(("hopper kernel[grid](...) alone", lambda: kern[grid](*args, **kw)))
        from fa3_inductor.kernels import launcher
        bkey = ("launch_overhead", id(kern), launcher.call_key((q, k, v, *operands)))
        out.append(("hopper launcher.launch alone (direct after the first)",
                    lambda: launcher.launch(bkey, kern, grid, args, kw)))
        out.append(("hopper._filled", lambda: hopper._filled(o, lse, v, prog)))
    if entry.name == "triton-decode":
        out.append(("triton_decode.split_plan", lambda: triton_decode.split_plan(q.shape[0], k.shape[1], k.shape[2],
                                                                                  q.device)))
    return out


def stub_op(prog, q, k, v, operands):
    """The op around a kernel that costs nothing: the custom-op machinery, program lookup, dispatch, record."""
    from fa3_inductor import dispatch

    out = (torch.empty(q.shape[:3] + v.shape[-1:], dtype=v.dtype, device=q.device),
           torch.empty(q.shape[:3], dtype=torch.float32, device=q.device))
    entry = dispatch.KernelEntry("stub", ("cuda",), False, lambda *a: None, lambda *a: out, None)
    s = prog.dumps()

    def run():
        orig = dispatch.select
        dispatch.select = lambda *a, **kw: (entry, [])
        try:
            torch.ops.fa3.attention(q, k, v, operands, s, "auto", "")
        finally:
            dispatch.select = orig
    return [("op with a free kernel (custom-op machinery + op body)", run)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    head = common.header("Host cost of one attention call (µs per call)", device)
    rows = []
    with torch.no_grad():
        for site, (prog, q, k, v, operands) in capture_sites(device).items():
            g = q.shape[1] // k.shape[1]
            sd_mask = operands[0] if operands and operands[0].dtype == torch.bool else None
            cands = [("SDPA (cuDNN/flash, same q k v)",
                      lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sd_mask, enable_gqa=g > 1)),
                     ("torch.ops.fa3.attention (whole op)",
                      lambda s=prog.dumps(): torch.ops.fa3.attention(q, k, v, operands, s, "auto", ""))]
            cands += pieces(prog, q, k, v, operands)
            cands += [("prog.dumps() (not paid by compiled graphs: a constant there)", prog.dumps)]
            cands += stub_op(prog, q, k, v, operands)
            for name, fn in cands:
                try:
                    us = per_call_us(fn, args.calls)
                    rows.append({"site": site, "shape": f"q{tuple(q.shape)} k{tuple(k.shape)}",
                                 "operands": [str(tuple(t.shape)) + str(t.dtype)[6:] for t in operands],
                                 "what": name, "us_per_call": us})
                except Exception as exc:
                    rows.append({"site": site, "what": name, "error": repr(exc)[:200]})
                print(rows[-1], flush=True)
    md = head + ["", "| site | what | µs per call |", "|---|---|---|"]
    for r in rows:
        md.append(f"| {r['site']} | {r['what']} | {common.fmt(r.get('us_per_call'), '.1f')} {r.get('error', '')}|")
    common.write_results(args.out, "launch_overhead", head, rows, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
