"""Host cost of one attention call, piece by piece (issue 6: the S=512 prefill, eager-mode decode and padded
BERT training are CPU-bound on it).

    python bench/launch_overhead.py [--out DIR] [--calls 300] [--scenarios llama,padded] [--cpu]

The sites are the real ones, recorded at the first run-time dispatch of a model compiled with backend="fa3":

llama   the ANCHORS Llama (S=512 prefill, and one decode step against a 4352-long StaticCache). Per site,
        microseconds of host time per call (wall time of `calls` back-to-back calls, no sync inside; the
        kernels are shorter than the host work, so the GPU never pushes back) for: cuDNN SDPA on the same q, k, v
        (the peer's host cost), the whole op (torch.ops.fa3.attention), the chosen kernel module's forward called
        directly, and its pieces (dispatch.select, the launch arguments, the bare kernel launch).
padded  bench/train.py's padded BERT (B=16, S=512, 16 heads x 64, bf16, a (B, 1, 1, S) key-padding mask), its
        sdpa site (empty_row=zero) and eager site (empty_row=uniform): host µs per call of fa3::attention and
        fa3::attention_backward (dout a transposed view, as torch.compile passes it) beside cuDNN SDPA's forward
        and backward ops (aten::_scaled_dot_product_cudnn_attention[_backward], what Inductor calls; the
        efficient-attention ops where cuDNN refuses), the work one call does (torch ops, allocations, device
        launches, Triton launches direct / ordinary, Python function calls) and a cProfile of one fa3
        forward + backward restricted to fa3_inductor's functions.

--cpu: the padded scenario only, on the tiny BERT in fp32 through the Triton interpreter (a check of the
script: its microseconds, torch ops and Python calls are the interpreter's; bench/host_counts.py counts the
H100's path on CPU). Writes launch_overhead[_cpu].json / .md under --out.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import os
import pstats
import re
import sys
import time

if "--cpu" in sys.argv:     # the interpreter is chosen when triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
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


def per_call_us(fn, calls: int, device=None) -> float:
    device = device or torch.device("cuda")
    for _ in range(10):
        fn()
    common.sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    common.sync(device)
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


# --- padded batch (BERT): forward and backward ---------------------------------------------------------------

def padded_sites(device) -> dict:
    """{site name: (prog, q, k, v, operands)}: the first fa3 dispatch of bench/train.py's padded BERT, compiled
    with backend="fa3" (every site rewritten), for its sdpa and eager attention."""
    import copy

    import train
    from fa3_inductor import dispatch
    cpu = device.type == "cpu"
    sites = {}
    for impl, name in (("sdpa", "bert sdpa (empty_row=zero)"), ("eager", "bert eager (empty_row=uniform)")):
        seen = []
        orig = dispatch.select

        def spy(prog, q, k, v, operands, *a, **kw):
            if not isinstance(q, torch._subclasses.FakeTensor) and not seen:
                seen.append((prog, q.clone(), k.clone(), v.clone(), [t.clone() for t in operands]))
            return orig(prog, q, k, v, operands, *a, **kw)

        model32, batch, _ = train.build("bert", impl, cpu, None, device)
        model = copy.deepcopy(model32).to(torch.float32 if cpu else torch.bfloat16)
        common.reset_dynamo()
        dispatch.select = spy
        try:
            with torch.no_grad():
                torch.compile(model, backend="fa3", options={"min_flops": 0})(**batch)
        finally:
            dispatch.select = orig
        sites[name] = seen[0]
        del model, model32
    return sites


class _Launches:
    """Counts Triton launches while active: direct (launcher's cached path) and ordinary (kernel[grid])."""

    def __init__(self):
        self.counts = collections.Counter()

    def __enter__(self):
        from triton.runtime.jit import KernelInterface

        from fa3_inductor.kernels import launcher
        self._saved = (launcher._run, KernelInterface.__getitem__)
        run, getitem, counts = launcher._run, KernelInterface.__getitem__, self.counts

        def counted_run(*a, **kw):
            counts["direct"] += 1
            return run(*a, **kw)

        def counted_getitem(kernel, grid):
            counts["ordinary"] += 1
            return getitem(kernel, grid)
        launcher._run, KernelInterface.__getitem__ = counted_run, counted_getitem
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import KernelInterface

        from fa3_inductor.kernels import launcher
        launcher._run, KernelInterface.__getitem__ = self._saved


_ALLOC = ("aten::empty", "aten::empty_strided")
_DEVICE_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def host_counts(fn, device) -> dict:
    """The work of one call of fn (warm): torch ops it calls (top level), allocations, device kernel launches
    (CUDA runtime/driver launch calls on a GPU), Triton launches direct / ordinary, Python function calls (all,
    and those of fa3_inductor)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    common.sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _Launches() as launches, profile(activities=acts) as prof:
        fn()
        common.sync(device)
    top, allocs, dev = collections.Counter(), 0, 0
    for e in prof.events():
        if e.name in _DEVICE_LAUNCH:
            dev += 1
        if not e.name.startswith("aten::"):
            continue
        if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"):
            top[e.name] += 1
        allocs += e.name in _ALLOC
    calls, calls_fa3 = common.python_calls(fn)
    return {"torch_ops": sum(top.values()), "torch_ops_by_name": dict(top), "allocations": allocs,
            "device_launches": dev if device.type == "cuda" else None,
            "triton_launches": dict(launches.counts), "python_calls": calls,
            "python_calls_fa3": calls_fa3}


def _sdpa_peer(q, k, v, mask, device):
    """(forward, backward) callables of the SDPA ops Inductor runs for this site (no autograd), and their name."""
    import torch.nn.functional as F
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(q.dtype)
    bias = bias.expand(b, hq, sq, sk)
    dout = torch.randn(b, sq, hq, v.shape[-1], dtype=q.dtype, device=device).transpose(1, 2)
    if device.type == "cuda":
        try:
            fwd = torch.ops.aten._scaled_dot_product_cudnn_attention
            o = fwd(q, k, v, bias, True)
            bwd = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
            args = (dout, q, k, v, o[0], o[1], o[6], o[7], bias, o[2], o[3], o[4], o[5], 0.0, False)
            bwd(*args)
            return (lambda: fwd(q, k, v, bias, True)), (lambda: bwd(*args)), "cuDNN SDPA"
        except Exception as exc:      # this build / GPU: fall back to the efficient-attention ops
            print(f"cuDNN SDPA ops refused: {exc!r}"[:300], flush=True)
        fwd = torch.ops.aten._scaled_dot_product_efficient_attention
        o = fwd(q, k, v, bias, True)
        bwd = torch.ops.aten._scaled_dot_product_efficient_attention_backward
        args = (dout, q, k, v, bias, o[0], o[1], o[2], o[3], 0.0, [True, True, True, False])
        return (lambda: fwd(q, k, v, bias, True)), (lambda: bwd(*args)), "efficient SDPA"
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(*leaves, attn_mask=bias)
    return ((lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)),
            (lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)), "SDPA (CPU, autograd backward)")


def padded_rows(site, prog, q, k, v, operands, calls, device) -> tuple[list, str]:
    """Rows of the padded scenario for one site, and the cProfile text of one fa3 forward + backward."""
    s = prog.dumps()
    b, hq, sq, _ = q.shape
    fwd = (lambda: torch.ops.fa3.attention(q, k, v, operands, s, "auto", ""))
    out, lse = fwd()
    # the gradient torch.compile hands the backward: a transposed view of the next op's (B, S, H, D) gradient
    dout = torch.randn(b, sq, hq, v.shape[-1], dtype=v.dtype, device=device).transpose(1, 2)
    bwd = (lambda: torch.ops.fa3.attention_backward(dout, q, k, v, operands, out, lse, s, "auto"))
    bwd()
    base = {"site": site, "shape": f"q{tuple(q.shape)} k{tuple(k.shape)}",
            "operands": [str(tuple(t.shape)) + str(t.dtype)[6:] for t in operands]}
    cands = [("fa3::attention (forward)", fwd), ("fa3::attention_backward", bwd)]
    try:
        pf, pb, peer = _sdpa_peer(q, k, v, operands[0], device)
        cands += [(f"{peer} forward", pf), (f"{peer} backward", pb)]
    except Exception as exc:
        print(f"{site}: no SDPA peer: {exc!r}"[:300], flush=True)
    rows = []
    for what, fn in cands:
        try:
            row = {**base, "what": what, "us_per_call": per_call_us(fn, calls, device)}
            if what.startswith("fa3"):
                row["counts"] = host_counts(fn, device)
        except Exception as exc:
            row = {**base, "what": what, "error": repr(exc)[:200]}
        rows.append(row)
        print(row, flush=True)
    pr = cProfile.Profile()
    pr.enable()
    fwd()
    bwd()
    common.sync(device)
    pr.disable()
    import fa3_inductor
    text = io.StringIO()
    # fa3_inductor's own files (the installed package; an editable install maps kernels/ elsewhere)
    roots = "|".join(re.escape(os.path.dirname(m.__file__)) for m in (fa3_inductor, fa3_inductor.kernels))
    pstats.Stats(pr, stream=text).sort_stats("cumulative").print_stats(roots)
    return rows, text.getvalue()


def _counts_cell(c: dict | None) -> str:
    if not c:
        return ""
    tl = c["triton_launches"]
    return (f"{c['torch_ops']} torch ops, {c['allocations']} allocs, "
            + (f"{c['device_launches']} device launches, " if c["device_launches"] is not None else "")
            + f"Triton {tl.get('direct', 0)} direct / {tl.get('ordinary', 0)} ordinary, "
            + f"{c['python_calls']} Python calls ({c['python_calls_fa3']} fa3_inductor)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=None, help="calls per measurement (default 300; --cpu 5)")
    ap.add_argument("--scenarios", default="llama,padded")
    ap.add_argument("--cpu", action="store_true", help="the padded scenario on the tiny BERT, interpreter")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    device = common.pick_device(args.cpu)
    cpu = device.type == "cpu"
    calls = args.calls or (5 if cpu else 300)
    scenarios = ["padded"] if cpu else args.scenarios.split(",")
    head = common.header("Host cost of one attention call (µs per call)", device)
    rows, profiles = [], {}
    if "llama" in scenarios:
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
                        us = per_call_us(fn, calls)
                        rows.append({"site": site, "shape": f"q{tuple(q.shape)} k{tuple(k.shape)}",
                                     "operands": [str(tuple(t.shape)) + str(t.dtype)[6:] for t in operands],
                                     "what": name, "us_per_call": us})
                    except Exception as exc:
                        rows.append({"site": site, "what": name, "error": repr(exc)[:200]})
                    print(rows[-1], flush=True)
    if "padded" in scenarios:
        with torch.no_grad():
            for site, (prog, q, k, v, operands) in padded_sites(device).items():
                site_rows, profiles[site] = padded_rows(site, prog, q, k, v, operands, calls, device)
                rows += site_rows
    md = head + ["", "| site | what | µs per call | work per call |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['site']} | {r['what']} | {common.fmt(r.get('us_per_call'), '.1f')} {r.get('error', '')}| "
                  f"{_counts_cell(r.get('counts'))} |")
    for site, text in profiles.items():
        md += ["", f"## cProfile of one fa3 forward + backward, {site} (fa3_inductor functions)", "", "```",
               text.strip(), "```"]
    common.write_results(args.out, "launch_overhead_cpu" if cpu else "launch_overhead", head, rows, md,
                         extra={"profiles": profiles})
    print("\n".join(md))


if __name__ == "__main__":
    main()
