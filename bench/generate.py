"""Generation benchmark (issue 6): HF `model.generate()` tokens/s with the forward compiled by fa3 vs Inductor vs
plain eager, DynamicCache and StaticCache, default and reduce-overhead (CUDA graphs) modes; then the split-KV
decode kernel alone: achieved memory bandwidth against the 3.0 TB/s copy ceiling of shared/ANCHORS.md.

    python bench/generate.py [--cpu] [--prompt 4096] [--new 256] [--batch 1] [--runs NAME,...] [--rounds 3]
                             [--reps 3] [--no-kernel] [--budget SECONDS] [--out DIR]

Model: the Llama of shared/ANCHORS.md (4 layers, hidden 2048, 16 heads x 128, 8 KV heads, bf16, random
weights); --cpu: a 2-layer tiny Llama in fp32, prompt 24 -> 8 tokens (checks the script end to end).
Greedy decoding, exactly --new tokens (min_new_tokens). A StaticCache is allocated once (prompt + new) and
reset before each call, so shapes and addresses stay fixed (what CUDA graphs need); the forward is compiled
with torch.compile(model.forward, ...) and transformers' own auto-compile is disabled.

Every run is compiled and warmed first, all held at once (runs of one attention implementation share the model's
weights; each compiled forward has its own code object, hence its own Dynamo cache), then timed in --rounds
rotated rounds (bench/common.rotated_rounds): the host drifts within a process by 15% and more, which decided
earlier fa3-vs-Inductor decode comparisons made one run after the other.

Per run: end-to-end tokens/s, prefill ms (a 1-token generate), decode ms/token (median [min, max] over rounds)
and tokens/s ((new - 1) tokens over the time beyond the 1-token call), the verdict against Inductor with the
same cache and compile mode, graphs compiled, recompiles during the timed calls,
fa3 kernels used, and how many leading generated tokens equal the eager+sdpa run's (bf16 near-ties may
differ legitimately). Writes generate[_cpu].json / .md under --out.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

COPY_CEILING_TBS = 3.0

# name -> (mode, attn_implementation, cache, torch.compile mode); order = priority under the budget
RUNS = {
    "eager-sdpa-dynamic": ("eager", "sdpa", "dynamic", None),
    "inductor-sdpa-static-ro": ("inductor", "sdpa", "static", "reduce-overhead"),
    "fa3-sdpa-static-ro": ("fa3", "sdpa", "static", "reduce-overhead"),
    "inductor-sdpa-dynamic": ("inductor", "sdpa", "dynamic", None),
    "fa3-sdpa-dynamic": ("fa3", "sdpa", "dynamic", None),
    "eager-sdpa-static": ("eager", "sdpa", "static", None),
    "inductor-sdpa-static": ("inductor", "sdpa", "static", None),
    "fa3-sdpa-static": ("fa3", "sdpa", "static", None),
    "fa3-eager-static-ro": ("fa3", "eager", "static", "reduce-overhead"),
}
REFERENCE_RUN = "eager-sdpa-dynamic"


def llama(impl: str, big: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    if big:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=16384)
    else:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


class Generator:
    """One run configuration over a model shared with the other runs of its attention implementation: its own
    compiled forward (a code object of its own, so runs compiled side by side keep separate Dynamo caches), its
    own StaticCache where it has one; generate(n) installs the run's forward for the call only."""

    def __init__(self, model, ids, run, prompt, new, name):
        mode, impl, cache, cmode = run
        self.model, self.ids, self.cache_kind = model, ids, cache
        self.eager_forward = model.forward
        self.fn = self.eager_forward
        self.counter = None
        self.cache = None
        if cache == "static":
            self.cache = common.static_cache(model, ids.shape[0], prompt + new, ids.device)
        if mode != "eager":
            self.counter = common.counting_backend("inductor" if mode == "inductor" else "fa3")
            kw = {"mode": cmode} if cmode else {}
            self.fn = torch.compile(common.own_code(self.eager_forward, f"generate {name}"), backend=self.counter,
                                    **kw)

    def __call__(self, n: int):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, disable_compile=True)
        if self.cache is not None:
            self.cache.reset()
            kw["past_key_values"] = self.cache
        self.model.forward = self.fn
        try:
            with torch.no_grad():
                return self.model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids), **kw)
        finally:
            self.model.forward = self.eager_forward


def time_call(fn, device, reps: int) -> float:
    times = []
    for _ in range(reps):
        common.sync(device)
        t = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


class Run:
    """One generate() configuration: compiled and checked once (warmup), then timed once per rotated round."""

    def __init__(self, name, model, ids, args, device):
        mode, impl, cache, cmode = RUNS[name]
        self.name, self.args, self.device, self.ids = name, args, device, ids
        self.rec = {"run": name, "mode": mode, "impl": impl, "cache": cache, "compile_mode": cmode or "default",
                    "batch": ids.shape[0], "prompt": ids.shape[1], "new": args.new}
        self.gen = Generator(model, ids, RUNS[name], args.prompt, args.new, name)
        self.kernels = common.DispatchCount()
        self.full_ms: list[float] = []
        self.one_ms: list[float] = []
        self.tokens = None

    def warm(self, ref_tokens) -> None:
        """Compiles the prefill and decode graphs (CUDA graphs record on a second call) and checks the tokens."""
        with common.SiteLog() as sites, self.kernels.counting():
            t0 = time.time()
            out = self.gen(self.args.new)
            self.gen(1)
            out = self.gen(self.args.new)
            self.rec["warmup_s"] = time.time() - t0
        if self.gen.counter is not None:
            self.rec["graphs"] = self.gen.counter.frame_count
            self.rec["sites_rewritten"] = sites.rewritten
            self.rec["sites_skipped"] = sites.skipped
        self.tokens = out[:, self.ids.shape[1]:].cpu()
        self.rec["tokens_head"] = self.tokens[0, :8].tolist()
        if ref_tokens is not None:
            same = (self.tokens == ref_tokens).all(0).long()
            self.rec["tokens_equal_prefix"] = int(same.cumprod(0).sum())

    def time_round(self) -> None:
        """The median of --reps calls of generate(new) and of generate(1), this round."""
        if "error" in self.rec:
            return
        try:
            with self.kernels.counting():
                self.gen(1)     # the first call after another run: its caches and graphs back in place
                self.full_ms.append(time_call(lambda: self.gen(self.args.new), self.device, self.args.reps))
                self.one_ms.append(time_call(lambda: self.gen(1), self.device, self.args.reps))
        except Exception as exc:
            traceback.print_exc()
            self.rec["error"] = repr(exc)[:300]

    def record(self) -> dict:
        rec = dict(self.rec)
        if self.full_ms and "error" not in rec:
            b, new = self.ids.shape[0], self.args.new
            decode = [(f - o) / max(1, new - 1) for f, o in zip(self.full_ms, self.one_ms)]
            full, one, dec = common.spread(self.full_ms), common.spread(self.one_ms), common.spread(decode)
            rec.update(total_ms=full["median"], prefill_ms=one["median"], e2e_tok_s=b * new / full["median"] * 1e3,
                       decode_ms_per_token=dec["median"], decode_ms_min=dec["min"], decode_ms_max=dec["max"],
                       decode_tok_s=b / max(1e-9, dec["median"]) * 1e3, rounds=len(self.full_ms),
                       decode_ms_rounds=decode)
            if self.gen.counter is not None:
                rec["recompiles"] = self.gen.counter.frame_count - rec["graphs"]
        if rec["mode"] == "fa3" and "error" not in rec:
            rec["kernels"] = dict(self.kernels.counts)
        return rec


def decode_verdicts(results: list[dict]) -> None:
    """Each fa3 run's decode time against Inductor's with the same cache and compile mode: "faster" / "slower"
    where the [min, max] ranges over rounds are apart, "within noise" where they overlap."""
    by = {(r.get("mode"), r.get("impl"), r.get("cache"), r.get("compile_mode")): r for r in results}
    for r in results:
        base = by.get(("inductor", r.get("impl"), r.get("cache"), r.get("compile_mode")))
        if r.get("mode") != "fa3" or base is None or "decode_ms_min" not in r or "decode_ms_min" not in base:
            continue
        span = lambda x: (x["decode_ms_per_token"], x["decode_ms_min"], x["decode_ms_max"])  # noqa: E731
        r["vs_inductor"] = f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x, " + \
            common.versus(span(r), span(base))


# --- the decode kernel alone -------------------------------------------------------------------------------

KERNEL_SHAPES = [
    # batch, query heads, kv heads, queries, cache length, head dim, bool mask (StaticCache-style)
    (1, 16, 8, 1, 4352, 128, False), (1, 16, 8, 1, 4352, 128, True), (1, 16, 8, 1, 16384, 128, False),
    (1, 16, 8, 1, 65536, 128, False), (8, 16, 8, 1, 4352, 128, False), (1, 32, 8, 1, 16384, 128, False),
    (1, 16, 8, 4, 16384, 128, False), (4, 8, 4, 1, 8192, 256, False),
]
CPU_KERNEL_SHAPES = [(1, 4, 2, 1, 100, 32, False), (1, 4, 2, 1, 100, 32, True)]


def kernel_bench(device, cpu: bool) -> list[dict]:
    """Per shape: the error against SDPA, then on a GPU the decode kernels' time (attn_decode + combine) and
    SDPA's, each as GPU time in a CUDA graph over copies of the cache that L2 cannot hold (what a decode step
    under reduce-overhead pays) and as the median of back-to-back calls with launch cost (triton do_bench, L2
    flushed: what default mode pays). Split counts: the default, and 2x / 4x it where the cap allows."""
    from fa3_inductor.kernels import triton_decode as td
    from fa3_inductor.kernels.program import ScoreProgram
    rows = []
    dtype = torch.float16 if cpu else torch.bfloat16   # the CPU interpreter computes bf16 dots wrongly
    for b, hq, hk, sq, sk, d, masked in (CPU_KERNEL_SHAPES if cpu else KERNEL_SHAPES):
        g = torch.Generator(device=device).manual_seed(0)
        nbytes = (2 * b * hk * sk * d + 2 * b * hq * sq * d) * torch.finfo(dtype).bits // 8 + \
            (b * sq * sk if masked else 0)
        n_copy = 1 if cpu else common.cold_copies(nbytes, device)
        qs = [torch.randn(b, hq, sq, d, device=device, dtype=dtype, generator=g) for _ in range(n_copy)]
        ks = [torch.randn(b, hk, sk, d, device=device, dtype=dtype, generator=g) for _ in range(n_copy)]
        vs = [torch.randn(b, hk, sk, d, device=device, dtype=dtype, generator=g) for _ in range(n_copy)]
        q, k, v = qs[0], ks[0], vs[0]
        ops, expr = [], ("mul", ("score",), ("const", d ** -0.5))
        mask = None
        if masked:
            mask = torch.ones(b, 1, sq, sk, dtype=torch.bool, device=device)
            mask[..., sk - sk // 17:] = False         # the unfilled tail of a static cache
            ops, expr = [mask], ("where", ("operand", 0), expr, ("const", float("-inf")))
        prog = ScoreProgram(expr, n_operands=len(ops), causal="none" if masked else "bottom_right",
                            empty_row="zero" if masked else "nan")
        visible = mask if masked else torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)
        grp = hq // hk
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1),
                                             attn_mask=visible).float()
        default_splits = td.split_plan(b, hk, sk, device)[0]
        sweep = [None] if cpu else [None] + [s for s in (2 * default_splits, 4 * default_splits)
                                             if s <= td.MAX_SPLITS and s * td.QUANTUM <= sk]
        for splits in sweep:
            row = {"B": b, "Hq": hq, "Hkv": hk, "Sq": sq, "Sk": sk, "D": d, "mask": masked, "bytes": nbytes,
                   "splits": td.split_plan(b, hk, sk, device, splits)[0], "copies": n_copy}
            try:
                out, _ = td.forward(q, k, v, ops, prog, splits)
                row["max_err_vs_sdpa"] = (out.float() - ref).abs().max().item()
                if not cpu:
                    fns = [functools.partial(td.forward, qc, kc, vc, ops, prog, splits)
                           for qc, kc, vc in zip(qs, ks, vs)]
                    for f in fns:
                        f()
                    row["graph_us"] = 1e3 * common.graph_ms(fns, device)
                    row["tb_s"] = nbytes / row["graph_us"] / 1e6
                    row["pct_of_copy"] = 100 * row["tb_s"] / COPY_CEILING_TBS
                    row["stream_us"] = 1e3 * triton.testing.do_bench(fns[0], return_mode="median")
                    if splits is None:
                        sd = [functools.partial(F.scaled_dot_product_attention, qc, kc, vc,
                                                attn_mask=visible if (masked or sq > 1) else None, enable_gqa=True)
                              for qc, kc, vc in zip(qs, ks, vs)]
                        for f in sd:
                            f()
                        row["sdpa_graph_us"] = 1e3 * common.graph_ms(sd, device)
                        row["sdpa_stream_us"] = 1e3 * triton.testing.do_bench(sd[0], return_mode="median")
            except Exception as exc:
                traceback.print_exc()
                row["error"] = repr(exc)[:300]
            rows.append(row)
            print("decode kernel", row, flush=True)
        del qs, ks, vs, q, k, v, ref
        common.free(device)
    return rows


# --- output ------------------------------------------------------------------------------------------------

def markdown(results, kernel_rows, head) -> list[str]:
    f = common.fmt
    lines = list(head) + ["", "## generate()", "",
                          "Greedy, exactly `new` tokens. Every run is compiled and warmed first, then timed in rotated "
                          "rounds (each round: every run, the order rotated). decode: (new - 1) tokens over the time "
                          "beyond a 1-token call, median [min, max] over rounds; vs Inductor: Inductor's decode time "
                          "with the same cache and compile mode over this run's, and whether the [min, max] ranges "
                          "are apart. equal prefix: leading generated tokens equal to eager+sdpa's (bf16 near-ties "
                          "may differ).", "",
                          "| run | cache | compile mode | prefill ms | decode ms/token [min, max] | decode tok/s | "
                          "vs Inductor | end-to-end tok/s | graphs (recompiles) | sites | equal prefix | fa3 kernels | "
                          "notes |", "|" + "---|" * 13]
    for r in results:
        kern = common.kernels_cell(r.get("kernels"))
        graphs = f"{r['graphs']} ({r.get('recompiles', '-')})" if "graphs" in r else "-"
        sites = f"{r['sites_rewritten']}" + (f", {len(r['sites_skipped'])} skipped" if r.get("sites_skipped") else "") \
            if r.get("mode") == "fa3" and "sites_rewritten" in r else "-"
        dec = f(r.get("decode_ms_per_token"), ".3f")
        if "decode_ms_min" in r:
            dec += f" [{r['decode_ms_min']:.3f}, {r['decode_ms_max']:.3f}]"
        lines.append(f"| {r['run']} | {r.get('cache', '-')} | {r.get('compile_mode', '-')} | {f(r.get('prefill_ms'), '.1f')} | "
                     f"{dec} | {f(r.get('decode_tok_s'), '.0f')} | {r.get('vs_inductor', '-')} | "
                     f"{f(r.get('e2e_tok_s'), '.0f')} | {graphs} | {sites} | {r.get('tokens_equal_prefix', '-')} | "
                     f"{kern} | {r.get('error') or r.get('skipped') or ''} |")
    if kernel_rows:
        lines += ["", f"## split-KV decode kernel alone (attn_decode + combine; bytes = K + V + q + out (+ mask); copy "
                      f"ceiling {COPY_CEILING_TBS} TB/s)", "",
                  "graph us: GPU time per call inside a CUDA graph, cycling through `copies` copies of the inputs "
                  "(together >= 4x L2, so every call reads HBM); TB/s and % of copy from it. stream us: median of "
                  "back-to-back calls (triton do_bench, L2 flushed), launch cost included. SDPA: "
                  "F.scaled_dot_product_attention(enable_gqa=True) timed the same way.", "",
                  "| B | Hq/Hkv | Sq | Sk | D | mask | splits | copies | graph us | TB/s | % of copy | SDPA graph us | "
                  "stream us | SDPA stream us | max err vs SDPA | error |", "|" + "---|" * 16]
        for r in kernel_rows:
            lines.append(f"| {r['B']} | {r['Hq']}/{r['Hkv']} | {r['Sq']} | {r['Sk']} | {r['D']} | {r['mask']} | "
                         f"{r.get('splits', '-')} | {r.get('copies', '-')} | {f(r.get('graph_us'), '.1f')} | "
                         f"{f(r.get('tb_s'), '.2f')} | {f(r.get('pct_of_copy'), '.0f')} | "
                         f"{f(r.get('sdpa_graph_us'), '.1f')} | {f(r.get('stream_us'), '.1f')} | "
                         f"{f(r.get('sdpa_stream_us'), '.1f')} | {f(r.get('max_err_vs_sdpa'), '.2e')} | "
                         f"{r.get('error', '')}".rstrip() + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="tiny model, fp32, on CPU")
    ap.add_argument("--prompt", type=int, default=None, help="prompt length (default 4096; --cpu 24)")
    ap.add_argument("--new", type=int, default=None, help="generated tokens (default 256; --cpu 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement and round (default 3; --cpu 1)")
    ap.add_argument("--rounds", type=int, default=None, help="rotated timing rounds (default 3; --cpu 1)")
    ap.add_argument("--runs", default=None, help=f"comma-separated of {list(RUNS)}")
    ap.add_argument("--no-kernel", action="store_true", help="skip the decode kernel bandwidth table")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later runs are skipped")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    device = common.pick_device(args.cpu)
    cpu = device.type == "cpu"
    args.prompt = args.prompt or (24 if cpu else 4096)
    args.new = args.new or (8 if cpu else 256)
    args.reps = args.reps or (1 if cpu else 3)
    args.rounds = args.rounds or (1 if cpu else 3)
    names = args.runs.split(",") if args.runs else list(RUNS)
    bad = [n for n in names if n not in RUNS]
    if bad:
        ap.error(f"unknown runs {bad}")
    budget = common.Budget(args.budget)
    dtype = torch.float32 if cpu else torch.bfloat16
    head = common.header(f"generate(): prompt {args.prompt} -> {args.new} tokens, batch {args.batch}, "
                         f"{'tiny Llama fp32' if cpu else 'ANCHORS Llama bf16'}", device)
    print("\n".join(head), flush=True)
    stem = "generate_cpu" if cpu else "generate"
    common.reset_dynamo()
    # frames past a graph break (generate()'s helpers, the model's modules) are shared by every run
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(RUNS))
    models = {}
    g = torch.Generator().manual_seed(1234)
    vocab = 128 if cpu else 32000
    ids = torch.randint(3, vocab, (args.batch, args.prompt), generator=g).to(device)
    runs, results, ref_tokens = [], [], None
    for name in [REFERENCE_RUN] + [n for n in names if n != REFERENCE_RUN]:
        if budget.left() <= 0:
            if name in names:
                results.append({"run": name, "skipped": "time budget"})
            continue
        impl = RUNS[name][1]
        if impl not in models:   # seeded: the same weights for every implementation
            models[impl] = llama(impl, not cpu, device, dtype)
        run = None
        try:
            run = Run(name, models[impl], ids, args, device)
            run.warm(ref_tokens)
            if name == REFERENCE_RUN:
                ref_tokens = run.tokens
            runs.append(run)
        except Exception as exc:
            traceback.print_exc()
            if name in names:
                results.append({"run": name, "error": repr(exc)[:300]})
            run = None
        if run is not None:
            print(name, "compiled", {k: v for k, v in run.rec.items() if k != "sites_skipped"}, flush=True)
    timed = [r for r in runs if r.name in names]    # the reference run is there for its tokens when not asked for
    done = common.rotated_rounds(timed, args.rounds, Run.time_round, budget)
    for run in timed:
        results.append(run.record())
        print(run.name, {k: v for k, v in results[-1].items() if k != "sites_skipped"}, flush=True)
    results.sort(key=lambda r: list(RUNS).index(r["run"]))
    decode_verdicts(results)
    head = head + [f"{done} rotated rounds of {args.reps} timed calls per run (asked {args.rounds})"]
    runs.clear()
    timed.clear()
    common.free(device)
    common.write_results(args.out, stem, head, results, markdown(results, [], head))
    kernel_rows = []
    if not args.no_kernel:
        from fa3_inductor.kernels import triton_portable
        if cpu and not triton_portable.interpreting():
            print("decode kernel table: needs a GPU, or TRITON_INTERPRET=1 on CPU (correctness only)")
        else:
            kernel_rows = kernel_bench(device, cpu)
    head = head + [f"elapsed {budget.elapsed():.0f} s of a {args.budget:.0f} s budget"]
    lines = markdown(results, kernel_rows, head)
    common.write_results(args.out, stem, head, results, lines, {"decode_kernel": kernel_rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
