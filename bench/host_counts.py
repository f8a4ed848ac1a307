"""Host work per call of fa3::attention and fa3::attention_backward on the H100's path, counted on a CPU.

    python bench/host_counts.py [--shape B,H,S,D] [--calls 200] [--backward ws|portable] [--only prefill|decode]
                                [--out DIR]

The dispatch table is made to pick what it picks on sm_90 (the Hopper forward; the Hopper backward, whose tuner
settles on its first warp-specialized candidate, or with --backward portable the portable backward, as for
sites the warp-specialized one declines), the tuner to behave as once it has settled, and every kernel launch
is recorded instead of run (Gluon cannot run on a CPU); the custom-op machinery, dispatch, plans, allocations
and launch bookkeeping run for real on CPU tensors. Per call (warm, after the plans exist), for a padded
batch's key-padding mask (bench/train.py's BERT sites: a (B, 1, 1, S) boolean operand, empty_row zero = its
sdpa site, uniform = its eager site; the same padding as a float finfo.min operand, as an eager site whose mask
is not proven passes it) and a dense additive float mask: torch ops the op body calls, allocations, torch ops
that launch a device kernel, Triton launches (direct = the launcher's cached path, ordinary = kernel[grid]),
Python function calls (all, and fa3_inductor's) and µs per call on this CPU with launches stubbed (a CPU's
allocator and dispatcher, not the H100 host's; CPU time of the process, best of five rounds).
dout is a transposed view, as torch.compile passes it. Decode (the split-KV decode entry, one generated token
against a Llama-like GQA cache, forward only): StaticCache (fixed shapes, a (B, 1, 1, Smax) boolean mask) and
DynamicCache (no operand, bottom-right causal, K/V one key longer on every call, as torch.cat leaves them:
contiguous, outer strides growing), counted on a later call; and the same with each length called 4 times in
a row, as the 4 layers of bench/generate.py's Llama call it (torch ops and launches counted on a length's first
call, Python calls on its second, time over all). "cache entries / call": how many entries the module-level
caches (launcher, dispatch, tuner, plans) gain per call over the timed calls. Writes host_counts.json / .md
under --out (with --backward portable: host_counts_portable_bwd.*).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402

LAUNCHES: collections.Counter = collections.Counter()


def stand_in_for_sm90(backward: str = "ws") -> None:
    """Record launches instead of running them; select the sm_90 entries for CPU tensors; a settled tuner.
    backward="portable": the warp-specialized backward declines every site."""
    from triton.runtime.jit import KernelInterface

    from fa3_inductor import dispatch
    from fa3_inductor.kernels import hopper, hopper_bwd, launcher
    from fa3_inductor.kernels import triton_portable as tp
    seen = set()

    def launch(key, kernel, grid, args, kwargs):
        if key is not None and key in seen:
            LAUNCHES["direct"] += 1
            return
        LAUNCHES["ordinary"] += 1
        if key is not None:
            seen.add(key)
            launcher._COMPILED[key] = ("recorded", ())      # what a first real launch leaves behind

    def run(hit, grid, args, kwargs):
        LAUNCHES["direct"] += 1

    def getitem(kernel, grid):
        def counted(*args, **kwargs):
            LAUNCHES["ordinary"] += 1
        return counted

    def settled(kind, key, d, dtype, device, launch_fn, configs=None, interpret_config=None):
        cfg = (configs or tp._CONFIGS[kind](d, dtype))[0]
        launch_fn(cfg)
        return cfg

    launcher.launch = launch
    if hasattr(launcher, "_run"):
        launcher._run = run
    KernelInterface.__getitem__ = getitem
    dispatch._runs_on = lambda entry, device: device in entry.devices or device == "cpu"
    hopper._not_sm90 = lambda device: None
    tp._launch_tuned = settled
    if backward == "portable":
        hopper_bwd._declines = lambda prog, q, v: "host_counts --backward portable"


def cases(shape):
    b, h, s, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g).half().transpose(1, 2) for _ in range(3))
    lengths = torch.randint(s // 4, s + 1, (b,), generator=g)
    keep = torch.arange(s)[None, :] < lengths[:, None]
    scaled = ("mul", ("score",), ("const", d ** -0.5))
    from fa3_inductor.kernels.program import ScoreProgram
    where = ("where", ("operand", 0), scaled, ("const", -math.inf))
    dense = torch.where(torch.rand(b, 1, s, s, generator=g) > 0.2, 0.0, torch.finfo(torch.float16).min).half()
    additive_keys = torch.where(keep, 0.0, torch.finfo(torch.float16).min).half()[:, None, None, :]
    return {
        "key padding, empty_row=zero (BERT sdpa)": (ScoreProgram(where, 1, empty_row="zero"),
                                                    (q, k, v, [keep[:, None, None, :]])),
        "key padding, empty_row=uniform (BERT eager)": (ScoreProgram(where, 1, empty_row="uniform"),
                                                        (q, k, v, [keep[:, None, None, :]])),
        "key padding as an additive finfo.min operand (BERT eager, mask not proven)": (
            ScoreProgram(("add", scaled, ("operand", 0)), 1, empty_row="nan"), (q, k, v, [additive_keys])),
        "dense additive finfo.min mask": (ScoreProgram(("add", scaled, ("operand", 0)), 1, empty_row="nan"),
                                          (q, k, v, [dense])),
    }


INFER_PASS = "forward, no_grad: attention_infer"
LAYERS = 4       # bench/generate.py's Llama (shared/ANCHORS.md): 4 layers call each length


def decode_cases(calls: int):
    """(name, program, call factory): each factory returns the next call's (q, k, v, operands)."""
    from fa3_inductor.kernels.program import ScoreProgram
    b, hq, hk, d, smax = 1, 32, 8, 128, 1024
    g = torch.Generator().manual_seed(0)
    scaled = ("mul", ("score",), ("const", d ** -0.5))
    q = torch.randn(b, 1, hq, d, generator=g).half().transpose(1, 2)     # (B, Hq, 1, D) view of the projection
    k, v = (torch.randn(b, hk, smax, d, generator=g).half() for _ in range(2))
    keep = torch.zeros(b, 1, 1, smax, dtype=torch.bool)
    keep[..., :300] = True

    def static():
        return q, k, v, [keep]

    # a DynamicCache's K/V after torch.cat: contiguous (B, Hk, S, D), S one longer per call (views of one flat
    # buffer: launches are recorded, so only shapes, strides and alignment matter)
    start = 200
    flat = torch.empty(b * hk * (start + calls + 16) * d, dtype=torch.float16)
    views = [flat.as_strided((b, hk, s, d), (hk * s * d, s * d, d, 1)) for s in range(start + calls, start, -1)]

    def dynamic():
        kv = views.pop()
        return q, kv, kv, []

    # fresh lengths (past the ones above), each taken by LAYERS calls in a row
    steps = -(-calls // LAYERS)
    flat2 = torch.empty(b * hk * (start + calls + 16 + steps) * d, dtype=torch.float16)
    layered = [flat2.as_strided((b, hk, s, d), (hk * s * d, s * d, d, 1))
               for s in range(start + calls + 16 + steps, start + calls + 16, -1) for _ in range(LAYERS)]

    def dynamic_layers():
        kv = layered.pop()
        return q, kv, kv, []

    return [("decode StaticCache: (B,1,1,Smax) bool mask", ScoreProgram(("where", ("operand", 0), scaled,
                                                                        ("const", -math.inf)), 1), static),
            ("decode DynamicCache: K/V one longer per call", ScoreProgram(scaled, causal="bottom_right"), dynamic),
            (f"decode DynamicCache: one longer every {LAYERS} calls (layers of a step)",
             ScoreProgram(scaled, causal="bottom_right"), dynamic_layers)]


def cache_sizes() -> int:
    """Entries of the module-level caches a call may add to (launcher, dispatch, tuner, specs, decode plans)."""
    from fa3_inductor import dispatch
    from fa3_inductor.kernels import launcher
    from fa3_inductor.kernels import triton_decode as td
    from fa3_inductor.kernels import triton_portable as tp
    n = len(launcher._COMPILED) + len(tp._TUNED) + len(tp._SPECS) + len(dispatch._SELECTED_BWD)
    n += sum(len(x) if isinstance(x, list) else 1 for x in dispatch._SELECTED.values())
    n += len(getattr(dispatch, "_SELECTED_CLASS", ()))
    for plan in getattr(td, "_PLANS", {}).values():
        n += 1 + len(plan.sites) + len(plan.cfgs)
    return n


def _aten_events(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e for e in prof.events() if e.name.startswith("aten::")]


_VIEWS = {"aten::expand", "aten::view", "aten::as_strided", "aten::slice", "aten::select", "aten::transpose",
          "aten::unsqueeze", "aten::permute", "aten::_reshape_alias", "aten::alias", "aten::is_nonzero",
          "aten::item", "aten::_local_scalar_dense", "aten::contiguous", "aten::empty", "aten::empty_strided"}


def measure(fn, calls: int) -> dict:
    for _ in range(3):      # warm; in the layered DynamicCache case the counted calls are then a later layer's
        fn()
    LAUNCHES.clear()
    events = _aten_events(fn)
    launches = dict(LAUNCHES)
    top = collections.Counter(e.name for e in events
                              if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    kernels = collections.Counter(e.name for e in events if e.name not in _VIEWS
                                  and not any(c.name.startswith("aten::") for c in e.cpu_children))
    calls, calls_fa3 = common.python_calls(fn)
    before = cache_sizes()
    rounds = []         # this process's CPU time, best of five rounds: the CPU is shared
    for _ in range(5):
        t = time.process_time()
        for _ in range(calls // 5):
            fn()
        rounds.append(time.process_time() - t)
    elapsed = min(rounds) * 5
    return {"cache_entries_per_call": (cache_sizes() - before) / (calls // 5 * 5), "torch_ops": sum(top.values()),
            "torch_ops_by_name": dict(top),
            "allocations": sum(1 for e in events if e.name in ("aten::empty", "aten::empty_strided")),
            "torch_kernels": sum(kernels.values()), "torch_kernels_by_name": dict(kernels),
            "triton_launches": launches, "python_calls": calls,
            "python_calls_fa3": calls_fa3,
            "cpu_us_per_call": elapsed / calls * 1e6}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2,4,64,64", help="B,H,S,D (counts do not depend on it)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--backward", choices=("ws", "portable"), default="ws",
                    help="the Hopper backward's warp-specialized kernel, or the portable one (as where ws declines)")
    ap.add_argument("--only", choices=("prefill", "decode"), help="only these cases")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    stand_in_for_sm90(args.backward)
    from fa3_inductor import dispatch, op
    shape = tuple(int(x) for x in args.shape.split(","))
    head = common.header("Host work per fa3 call on the H100's path, counted on CPU (launches recorded), "
                         f"{args.backward} backward", torch.device("cpu"))
    rows = []
    infer = hasattr(torch.ops.fa3, "attention_infer")
    # (pass, op, grad mode): the autograd op as a training graph (or an eager caller) calls it, and the op
    # without autograd that a graph compiled under no_grad calls (generate(): prefill and decode)
    forwards = [("forward", lambda: torch.ops.fa3.attention, torch.enable_grad)]
    if infer:
        forwards.append((INFER_PASS, lambda: torch.ops.fa3.attention_infer, torch.no_grad))
    for what, target, grad_mode in forwards if args.only != "prefill" else []:
        for name, prog, factory in decode_cases(8 + args.calls):
            s = prog.dumps()
            q, k, v, ops = factory()
            entry = dispatch.select(op.load_program(s), q, k, v, ops)[0].name

            def fn(s=s, factory=factory, call=target()):
                q, k, v, ops = factory()
                return call(q, k, v, ops, s, "auto", "")
            with grad_mode():
                rows.append({"case": name, "pass": what, "entry": entry, **measure(fn, args.calls)})
            print(rows[-1], flush=True)
    for name, (prog, (q, k, v, ops)) in (cases(shape).items() if args.only != "decode" else ()):
        s = prog.dumps()
        entry = dispatch.select(op.load_program(s), q, k, v, ops)[0].name
        bwd_entry = dispatch.select_backward(op.load_program(s), q, k, v, ops)[0].name
        out, lse = torch.ops.fa3.attention(q, k, v, ops, s, "auto", "")
        out.normal_(), lse.zero_()      # launches are recorded, not run: a valid forward's (out, lse)
        b, hq, sq, dv = out.shape
        dout = torch.randn(b, sq, hq, dv).half().transpose(1, 2)
        passes = [("forward", lambda: torch.ops.fa3.attention(q, k, v, ops, s, "auto", ""), torch.enable_grad)]
        if infer:
            passes.append((INFER_PASS, lambda: torch.ops.fa3.attention_infer(q, k, v, ops, s, "auto", ""),
                           torch.no_grad))
        passes.append(("backward", lambda: torch.ops.fa3.attention_backward(dout, q, k, v, ops, out, lse, s, "auto"),
                       torch.enable_grad))
        for what, fn, grad_mode in passes:
            with grad_mode():
                rows.append({"case": name, "pass": what, "entry": entry if what != "backward" else bwd_entry,
                             **measure(fn, args.calls)})
            print(rows[-1], flush=True)
    md = head + ["", f"shape B,H,S,D = {shape}", "",
                 "| case | pass | torch ops | allocations | torch kernels | Triton launches (direct/ordinary) "
                 "| Python calls (fa3_inductor) | CPU µs/call | cache entries / call |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tl = r["triton_launches"]
        md.append(f"| {r['case']} | {r['pass']} | {r['torch_ops']} {r['torch_ops_by_name']} | {r['allocations']} "
                  f"| {r['torch_kernels']} | {tl.get('direct', 0)}/{tl.get('ordinary', 0)} "
                  f"| {r['python_calls']} ({r['python_calls_fa3']}) | {r['cpu_us_per_call']:.1f} "
                  f"| {r['cache_entries_per_call']:.2f} |")
    common.write_results(args.out, "host_counts" if args.backward == "ws" else "host_counts_portable_bwd", head,
                         rows, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
