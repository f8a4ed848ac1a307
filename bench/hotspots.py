"""Where the time goes (issue 6 diagnostics): torch.profiler and cProfile over one model scenario, fa3 beside
Inductor, so that a gap in bench/models.py, generate.py or train.py can be traced to kernels, host work or syncs.

    python bench/hotspots.py [--scenarios prefill512,decode,train-bert] [--out DIR] [--cpu]

Scenarios (GPU sizes of the benchmarks; --cpu: tiny sizes, fp32, a check of the script):
  prefill512   ANCHORS Llama at B=2, S=512 (bench/models.py's llama-s512), one no-grad forward;
  decode       generate() 16 tokens after a 4096 prompt, StaticCache, default compile mode (no CUDA graphs, so
               the profiler sees every kernel of the decode steps);
  decode-ro    the same with mode="reduce-overhead" (CUDA graphs; the header counts Inductor's cudagraph skips);
  decode-dynamic  the same with a DynamicCache (the cache grows every token: dynamic shapes);
  train-bert   one AdamW step of the padded BERT of bench/train.py;
  zoo-MODEL-IMPL  one no-grad prefill of a bench/models.py case (e.g. zoo-whisper-eager, zoo-t5-sdpa), the
               sizes of its zoo row.
Per scenario and mode: wall ms per iteration, the top CUDA kernels (total µs per iteration and calls), the top
host ops by self CPU time, device->host syncs (cudaStreamSynchronize / cudaMemcpy calls), and for fa3 the
cProfile of one iteration (Python functions by cumulative time). Writes hotspots[_cpu].txt under --out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

SCENARIOS = ("prefill512", "decode", "decode-ro", "decode-dynamic", "train-bert")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def decode(mode, device, cpu, compile_mode=None, cache="static"):
    import generate
    dtype = torch.float32 if cpu else torch.bfloat16
    prompt, new = (24, 4) if cpu else (4096, 16)
    model = generate.llama("sdpa", not cpu, device, dtype)
    ids = torch.randint(1, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    gen = generate.Generator(model, ids, (mode, "sdpa", cache, compile_mode), prompt, new)
    return lambda: gen(new)


def decode_ro(mode, device, cpu):
    return decode(mode, device, cpu, "reduce-overhead")


def decode_dynamic(mode, device, cpu):
    return decode(mode, device, cpu, cache="dynamic")


def train_bert(mode, device, cpu):
    import copy

    import train
    dtype = torch.float32 if cpu else torch.bfloat16
    model32, batch, loss_fn = train.build("bert", "sdpa", cpu, None, device)
    model = copy.deepcopy(model32).to(dtype)
    common.reset_dynamo()
    fn = torch.compile(model, backend="inductor" if mode == "inductor" else "fa3")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(fn, batch).backward()
        opt.step()
    return step


def zoo_prefill(case, impl):
    """A bench/models.py row's prefill (its model, inputs and dtype), as that row times it."""
    def build(mode, device, cpu):
        import models
        dtype = torch.float32 if cpu else torch.bfloat16
        model, inputs, _ = models.build(case, impl, "tiny" if cpu else "bench", device)
        model, inputs = model.to(dtype), models.cast(inputs, dtype)
        common.reset_dynamo()
        fn = torch.compile(model, backend="inductor" if mode == "inductor" else "fa3")

        def step():
            with torch.no_grad():
                fn(**inputs)
        return step
    return build


def prefill512(mode, device, cpu):
    return zoo_prefill("llama-s512", "sdpa")(mode, device, cpu)


BUILDERS = {"prefill512": prefill512, "decode": decode, "decode-ro": decode_ro, "decode-dynamic": decode_dynamic,
            "train-bert": train_bert}


def builder(name):
    """The scenario's builder: a fixed one, or zoo-MODEL-IMPL for any bench/models.py case."""
    if name in BUILDERS:
        return BUILDERS[name]
    if name.startswith("zoo-") and name.count("-") >= 2:
        import models
        case, impl = name[4:].rsplit("-", 1)
        if case in models.case_table() and impl in ("eager", "sdpa"):
            return zoo_prefill(case, impl)
    return None


def table(rows, n_iter, top, unit="us") -> list[str]:
    out = []
    for name, total, calls in rows[:top]:
        out.append(f"  {total / n_iter:10.1f} {unit}/iter  {calls / n_iter:7.1f} calls/iter  {name[:110]}")
    return out


def profile_one(name, mode, device, cpu, iters) -> list[str]:
    from torch._dynamo.utils import counters
    counters.clear()
    step = builder(name)(mode, device, cpu)
    for _ in range(3):      # compile, autotune, warm caches
        step()
    common.sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    common.sync(device)
    wall = (time.perf_counter() - t) / iters * 1e3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        common.sync(device)
    ev = prof.key_averages()
    from torch._dynamo.utils import counters
    lines = [f"## {name} / {mode}: {wall:.3f} ms per iteration (wall, {iters} iterations); "
             f"inductor counters {dict(counters['inductor'])}"]
    if device.type == "cuda":
        kern = sorted(((e.key, e.device_time_total, e.count) for e in ev if e.device_time_total > 0
                       and e.self_device_time_total > 0), key=lambda r: -r[1])
        total = sum(r[1] for r in kern)
        lines += [f" CUDA kernels: {total / iters / 1e3:.3f} ms per iteration in all; top:"] + table(kern, iters, 25)
    host = sorted(((e.key, e.self_cpu_time_total, e.count) for e in ev), key=lambda r: -r[1])
    lines += [" host ops by self CPU time:"] + table(host, iters, 20)
    syncs = [(e.key, e.self_cpu_time_total, e.count) for e in ev if e.key in SYNC_EVENTS]
    lines += [" syncs / copies:"] + (table(syncs, iters, 10) or ["  none"])
    if mode == "fa3":
        pr = cProfile.Profile()
        pr.enable()
        step()
        common.sync(device)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
        lines += [" cProfile of one fa3 iteration (cumulative):", s.getvalue()]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--modes", default="inductor,fa3")
    ap.add_argument("--iters", type=int, default=None, help="profiled iterations (default 5; --cpu 1)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    device = common.pick_device(args.cpu)
    cpu = device.type == "cpu"
    names = args.scenarios.split(",")
    bad = [n for n in names if builder(n) is None]
    if bad:
        ap.error(f"unknown scenarios {bad}; choose from {list(BUILDERS)} or zoo-MODEL-IMPL")
    iters = args.iters or (1 if cpu else 5)
    lines = common.header("Profiles of model scenarios, fa3 vs Inductor", device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "hotspots_cpu.txt" if cpu else "hotspots.txt")
    for name in names:
        for mode in args.modes.split(","):
            try:
                lines += [""] + profile_one(name, mode, device, cpu, iters)
            except Exception as exc:      # one scenario's failure must not lose the others
                import traceback
                traceback.print_exc()
                lines += ["", f"## {name} / {mode}: error {exc!r}"[:400]]
            print("\n".join(lines[-60:]), flush=True)
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            common.free(device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
