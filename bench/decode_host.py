"""Host time per call of a compiled generate() decode step, fa3 backend vs Inductor, A/B interleaved (issue 6).

    python bench/decode_host.py [--cpu [--sm90-standin]] [--caches static,dynamic]
                                [--variants inductor,fa3,fa3-skip,fa3-off] [--rounds 5] [--prompt 4096] [--new 128]
                                [--out DIR]

bench/generate.py measured the StaticCache decode at 4.07 ms/token with backend="fa3" against 3.41 with Inductor
while the fa3 backend kept every decode site for Inductor, i.e. both decode graphs should be Inductor's. That
script times each run once, one after the other in one process. This one compiles every variant into the same
process, each through its own code object (its own Dynamo cache: no variant's guards are evaluated for
another), and times them in rounds whose variant order rotates, so drift of the host cancels out. Variants:

inductor   Inductor through torch._TorchCompileInductorWrapper (what bench/generate.py's "inductor" runs use)
fa3        backend fa3 as configured (on CUDA the measured site choice decides each static site)
fa3-skip   backend fa3 with the site analysis run but every site kept for Inductor (site_choice.choose
           patched to keep): the graph Inductor gets must equal the inductor variant's
fa3-off    backend fa3 with options={"enabled": False} (no site analysis at all)

Per variant and cache: the Inductor output code of each compiled graph (hashed, the AOT ID line left out; "=="
where a graph's code equals the inductor variant's graph of that kind), Python function calls per decode call
(cProfile; guards' Python lambdas included), host µs per decode call (perf_counter around the compiled
forward, no sync inside: generate() syncs once per token anyway; median over all decode calls of a round, then
median / min / max over rounds), generate()'s decode ms/token ((new - 1) tokens over the time beyond a
1-token call, as bench/generate.py computes it; median over rounds) and the garbage collector's pauses per
generate(new). The first variant is also timed alone before the others are compiled (its "before" row): a
process-wide effect of an fa3 compile (a thread left running, a larger heap, the allocator) would move its later
row away from that one while the A/B rows stay equal. Expected when the fa3 backend adds no host work: fa3-skip
and fa3-off show "==" code, the same Python calls and host µs within the rounds' spread of the inductor variant;
fa3 too for StaticCache when its decode sites are kept.

Model: bench/generate.py's (ANCHORS Llama, 4 layers, bf16 on CUDA; --cpu: the 2-layer tiny Llama in fp32, where
the fa3 variant's rewritten decode sites run the CPU reference, so only fa3-skip / fa3-off are meaningful
there, unless --sm90-standin sends the op down the H100's dispatch path with its launches recorded instead of
run, as bench/host_counts.py does: then the fa3 rows carry the GPU's host work of the op, not its kernel).
Writes decode_host[_cpu][_sm90_standin].json / .md under --out.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import gc
import os
import pstats
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402

VARIANTS = ("inductor", "fa3", "fa3-skip", "fa3-off")


class CodeLog:
    """Inductor output-code modules (those with a `call`) loaded while a compile runs, hashed."""

    def __init__(self):
        self.graphs: list[tuple[str, str]] = []     # (kind: prefill / decode, code hash)

    @contextlib.contextmanager
    def recording(self, kind: str):
        with common.inductor_output_code() as sources:
            yield
        self.graphs += [(kind, common.code_hash(src)[:12]) for src in sources]


def graph_kind(gm) -> str:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and "input_ids" in node.name:
            val = node.meta.get("example_value")
            if val is not None and val.dim() == 2:
                return "decode" if val.shape[-1] == 1 else "prefill"
    return "other"


def make_backend(variant: str, log: CodeLog):
    from fa3_inductor import backend as fa3

    def compile_graph(gm, example_inputs):
        with log.recording(graph_kind(gm)):
            if variant == "inductor":
                return torch._TorchCompileInductorWrapper(None, None, None)(gm, example_inputs)
            if variant == "fa3-off":
                return fa3.fa3_backend(gm, example_inputs, options={"enabled": False})
            if variant == "fa3-skip":
                orig = fa3.choose
                fa3.choose = lambda *a, **k: ("kept for Inductor (decode_host fa3-skip)", "")
                try:
                    return fa3.fa3_backend(gm, example_inputs)
                finally:
                    fa3.choose = orig
            return fa3.fa3_backend(gm, example_inputs)
    return compile_graph


class Variant:
    def __init__(self, name, cache_kind, model, ids, prompt, new):
        self.name, self.cache_kind, self.model, self.ids, self.new = name, cache_kind, model, ids, new
        self.log = CodeLog()
        self.compiled = torch.compile(common.own_code(model.forward, f"{name}-{cache_kind}"),
                                      backend=make_backend(name, self.log))
        self.cache = None
        if cache_kind == "static":
            self.cache = common.static_cache(model, ids.shape[0], prompt + new, ids.device)
        self.host_s: list[float] = []
        self.profile: cProfile.Profile | None = None
        self.profiled = 0

    def forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[-1] != 1:
            return self.compiled(*args, **kwargs)
        if self.profile is not None:
            self.profile.enable()
            out = self.compiled(*args, **kwargs)
            self.profile.disable()
            self.profiled += 1
            return out
        t = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        self.host_s.append(time.perf_counter() - t)
        return out

    def generate(self, n: int):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, disable_compile=True)
        if self.cache is not None:
            self.cache.reset()
            kw["past_key_values"] = self.cache
        eager = self.model.forward
        self.model.forward = self.forward
        try:
            with torch.no_grad():
                return self.model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids), **kw)
        finally:
            self.model.forward = eager

    def python_calls_per_decode_call(self) -> float:
        self.profile, self.profiled = cProfile.Profile(), 0
        try:
            self.generate(self.new)
        finally:
            prof, self.profile = self.profile, None
        return sum(v[1] for v in pstats.Stats(prof).stats.values()) / max(1, self.profiled)


def timed(fn, device) -> float:
    common.sync(device)
    t = time.perf_counter()
    fn()
    common.sync(device)
    return time.perf_counter() - t


class GcPauses:
    """Seconds the cyclic garbage collector ran (gc.callbacks), to tell a slower heap from slower code."""

    def __init__(self):
        self.total, self._start = 0.0, None
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.total += time.perf_counter() - self._start
            self._start = None


def time_round(v: "Variant", args, device, gc_pauses: GcPauses) -> tuple[float, float, float]:
    """(host µs per decode call: median over the round's calls, decode ms/token, GC ms per generate(new))."""
    v.host_s = []
    g0 = gc_pauses.total
    full = timed(lambda: v.generate(args.new), device)
    gc_ms = (gc_pauses.total - g0) * 1e3
    one = timed(lambda: v.generate(1), device)
    return statistics.median(v.host_s) * 1e6, (full - one) / (args.new - 1) * 1e3, gc_ms


def warm(v: "Variant", args, sites) -> None:
    n0 = len(sites.lines)
    v.generate(args.new)             # compiles prefill and decode graphs (DynamicCache: also the dynamic one)
    v.generate(1)
    v.generate(args.new)
    v.sites = sites.lines[n0:]


def summary(cache_kind, name, times, extra) -> dict:
    hs, tok, gcs = zip(*times)
    return {"cache": cache_kind, "variant": name, **extra, "host_us_median": statistics.median(hs),
            "host_us_min": min(hs), "host_us_max": max(hs), "host_us_rounds": list(hs),
            "decode_ms_per_token": statistics.median(tok), "decode_ms_per_token_rounds": list(tok),
            "gc_ms_per_generate": statistics.median(gcs)}


def measure(cache_kind, names, model, ids, args, device) -> list[dict]:
    gc_pauses = GcPauses()
    variants = [Variant(n, cache_kind, model, ids, args.prompt, args.new) for n in names]
    rows = []
    with common.SiteLog() as sites:
        # the first variant alone, before any other is compiled: a process-wide effect of compiling the others
        # (threads, heap, allocator) would show as a change of its time between this row and its later one
        warm(variants[0], args, sites)
        before = [time_round(variants[0], args, device, gc_pauses) for _ in range(args.rounds)]
        rows.append(summary(cache_kind, f"{names[0]} (before the others compiled)", before,
                            {"graphs": [], "sites": "-", "python_calls_per_decode_call": None}))
        for v in variants[1:]:
            warm(v, args, sites)
    threads = sorted(t.name for t in threading.enumerate())
    times = {v.name: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            times[v.name].append(time_round(v, args, device, gc_pauses))
    gc.callbacks.remove(gc_pauses)
    ref = {}
    for v in variants:
        if v.name == "inductor":
            for kind, h in v.log.graphs:
                ref.setdefault(kind, []).append(h)
    for v in variants:
        code = [f"{kind} {h}" + (" ==" if h in ref.get(kind, ()) and v.name != "inductor" else "")
                for kind, h in v.log.graphs]
        rewritten = sum(ln.startswith("fa3 rewritten") for ln in v.sites)
        skipped = sum(ln.startswith("fa3 skipped") for ln in v.sites)
        rows.append(summary(cache_kind, v.name, times[v.name], {
            "graphs": code, "sites": f"{rewritten} rewritten, {skipped} skipped" if v.name != "inductor" else "-",
            "python_calls_per_decode_call": v.python_calls_per_decode_call(), "threads": threads}))
    for row in rows:
        print({k: x for k, x in row.items() if not k.endswith("rounds")}, flush=True)
    return rows


def markdown(rows, head) -> list[str]:
    lines = list(head) + ["", "Host µs per decode call: perf_counter around the compiled forward inside generate(), "
                          "median over a round's calls; median [min, max] over rounds (variant order rotated per "
                          "round). Graph code: hash of Inductor's output code, '==' equal to the inductor "
                          "variant's graph of that kind.", "",
                          "| cache | variant | sites | graph code | Python calls / decode call | host µs / decode call "
                          "| generate decode ms/token | GC ms / generate |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['variant']} | {r['sites']} | {', '.join(r['graphs']) or '-'} | "
                     f"{common.fmt(r['python_calls_per_decode_call'], '.0f')} | {r['host_us_median']:.0f} "
                     f"[{r['host_us_min']:.0f}, {r['host_us_max']:.0f}] | {r['decode_ms_per_token']:.3f} | "
                     f"{r['gc_ms_per_generate']:.1f} |")
    return lines


def main(argv=None):
    import generate
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny model, fp32, on CPU")
    ap.add_argument("--caches", default="static,dynamic")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=None, help="default 4096 (--cpu 24)")
    ap.add_argument("--new", type=int, default=None, help="default 128 (--cpu 32)")
    ap.add_argument("--sm90-standin", action="store_true",
                    help="with --cpu: the fa3 op takes the H100's dispatch path, launches recorded, not run "
                         "(bench/host_counts.py's stand-in), so the fa3 variant's host work is the GPU's")
    ap.add_argument("--budget", type=float, default=None, help="accepted for bench/issue6_gpu.sh; unused")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    if set(names) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(set(names) - set(VARIANTS))}")
    device = common.pick_device(args.cpu)
    cpu = device.type == "cpu"
    if cpu:
        torch.set_num_threads(1)    # Inductor's OpenMP kernels on a shared 2-core host: barriers stall for ms
    if args.sm90_standin:
        if not cpu:
            ap.error("--sm90-standin is for --cpu")
        import host_counts
        host_counts.stand_in_for_sm90()
    args.prompt = args.prompt or (24 if cpu else 4096)
    args.new = args.new or (32 if cpu else 128)
    head = common.header(f"decode step host time: prompt {args.prompt} + {args.new} tokens, "
                         f"{'tiny Llama fp32' if cpu else 'ANCHORS Llama bf16'}, rounds {args.rounds}", device)
    print("\n".join(head), flush=True)
    model = generate.llama("sdpa", not cpu, device, torch.float32 if cpu else torch.bfloat16)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 128 if cpu else 32000, (1, args.prompt), generator=g).to(device)
    rows = []
    for cache_kind in args.caches.split(","):
        common.reset_dynamo()
        rows += measure(cache_kind, names, model, ids, args, device)
        common.free(device)
    stem = "decode_host" + ("_cpu" if cpu else "") + ("_sm90_standin" if args.sm90_standin else "")
    lines = markdown(rows, head)
    common.write_results(args.out, stem, head, rows, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
