"""Generation benchmark (issue 6): HF `model.generate()` tokens/s with the forward compiled by fa3 vs Inductor vs
plain eager, DynamicCache and StaticCache, default and reduce-overhead (CUDA graphs) modes; then the split-KV
decode kernel alone: achieved memory bandwidth against the 3.0 TB/s copy ceiling of shared/ANCHORS.md.

    python bench/generate.py [--cpu] [--prompt 4096] [--new 256] [--batch 1] [--runs NAME,...]
                             [--no-kernel] [--budget SECONDS] [--out DIR]

Model: the Llama of shared/ANCHORS.md (4 layers, hidden 2048, 16 heads x 128, 8 KV heads, bf16, random
weights); --cpu: a 2-layer tiny Llama in fp32, prompt 24 -> 8 tokens (checks the script end to end).
Greedy decoding, exactly --new tokens (min_new_tokens). A StaticCache is allocated once (prompt + new) and
reset before each call, so shapes and addresses stay fixed (what CUDA graphs need); the forward is compiled
with torch.compile(model.forward, ...) and transformers' own auto-compile is disabled.

Per run: end-to-end tokens/s, prefill ms (a 1-token generate), decode ms/token and tokens/s
((new - 1) tokens over the time beyond the 1-token call), graphs compiled, recompiles during the timed calls,
fa3 kernels used, and how many leading generated tokens equal the eager+sdpa run's (bf16 near-ties may
differ legitimately). Writes generate[_cpu].json / .md under --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

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
    """One model + one run configuration: generate(n) with fixed inputs, the cache policy and compile mode."""

    def __init__(self, model, ids, run, prompt, new):
        mode, impl, cache, cmode = run
        self.model, self.ids, self.cache_kind = model, ids, cache
        self.eager_forward = model.forward
        self.counter = None
        self.cache = None
        if cache == "static":
            self.cache = common.static_cache(model, ids.shape[0], prompt + new, ids.device)
        if mode != "eager":
            common.reset_dynamo()
            self.counter = common.counting_backend("inductor" if mode == "inductor" else "fa3")
            kw = {"mode": cmode} if cmode else {}
            model.forward = torch.compile(self.eager_forward, backend=self.counter, **kw)

    def __call__(self, n: int):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, disable_compile=True)
        if self.cache is not None:
            self.cache.reset()
            kw["past_key_values"] = self.cache
        with torch.no_grad():
            return self.model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids), **kw)

    def close(self):
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


def run_one(name, models, ids, args, device, ref_tokens) -> dict:
    run = RUNS[name]
    mode, impl, cache, cmode = run
    model = models[impl]
    rec = {"run": name, "mode": mode, "impl": impl, "cache": cache, "compile_mode": cmode or "default",
           "batch": ids.shape[0], "prompt": ids.shape[1], "new": args.new}
    gen = Generator(model, ids, run, args.prompt, args.new)
    before = common.dispatch_snapshot()
    try:
        with common.SiteLog() as sites:
            t0 = time.time()
            out = gen(args.new)          # compiles the prefill and the decode graphs
            gen(1)
            out = gen(args.new)          # CUDA graphs record on a second call
            rec["warmup_s"] = time.time() - t0
        if gen.counter is not None:
            rec["graphs"] = gen.counter.frame_count
            rec["sites_rewritten"] = sites.rewritten
            rec["sites_skipped"] = sites.skipped
        full_ms = time_call(lambda: gen(args.new), device, args.reps)
        one_ms = time_call(lambda: gen(1), device, args.reps)
        if gen.counter is not None:
            rec["recompiles"] = gen.counter.frame_count - rec["graphs"]
        b, new = ids.shape[0], args.new
        rec.update(total_ms=full_ms, prefill_ms=one_ms, e2e_tok_s=b * new / full_ms * 1e3,
                   decode_ms_per_token=(full_ms - one_ms) / max(1, new - 1),
                   decode_tok_s=b * (new - 1) / max(1e-6, full_ms - one_ms) * 1e3)
        tokens = out[:, ids.shape[1]:].cpu()
        rec["tokens_head"] = tokens[0, :8].tolist()
        if ref_tokens is not None:
            same = (tokens == ref_tokens).all(0).long()
            rec["tokens_equal_prefix"] = int(same.cumprod(0).sum())
        if mode == "fa3":
            rec["kernels"] = common.dispatch_delta(before)
        rec["_tokens"] = tokens
    finally:
        gen.close()
    return rec


# --- the decode kernel alone -------------------------------------------------------------------------------

KERNEL_SHAPES = [
    # batch, query heads, kv heads, queries, cache length, head dim, bool mask (StaticCache-style)
    (1, 16, 8, 1, 4352, 128, False), (1, 16, 8, 1, 4352, 128, True), (1, 16, 8, 1, 16384, 128, False),
    (1, 16, 8, 1, 65536, 128, False), (8, 16, 8, 1, 4352, 128, False), (1, 32, 8, 1, 16384, 128, False),
    (1, 16, 8, 4, 16384, 128, False), (4, 8, 4, 1, 8192, 256, False),
]
CPU_KERNEL_SHAPES = [(1, 4, 2, 1, 100, 32, False), (1, 4, 2, 1, 100, 32, True)]


def kernel_bench(device, cpu: bool) -> list[dict]:
    from fa3_inductor.kernels import triton_decode as td
    from fa3_inductor.kernels.program import ScoreProgram
    rows = []
    dtype = torch.float16 if cpu else torch.bfloat16   # the CPU interpreter computes bf16 dots wrongly
    for b, hq, hk, sq, sk, d, masked in (CPU_KERNEL_SHAPES if cpu else KERNEL_SHAPES):
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, hq, sq, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(b, hk, sk, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(b, hk, sk, d, device=device, dtype=dtype, generator=g)
        ops, expr = [], ("mul", ("score",), ("const", d ** -0.5))
        mask = None
        if masked:
            mask = torch.ones(b, 1, sq, sk, dtype=torch.bool, device=device)
            mask[..., sk - sk // 17:] = False         # the unfilled tail of a static cache
            ops, expr = [mask], ("where", ("operand", 0), expr, ("const", float("-inf")))
        prog = ScoreProgram(expr, n_operands=len(ops), causal="none" if masked else "bottom_right",
                            empty_row="zero" if masked else "nan")
        row = {"B": b, "Hq": hq, "Hkv": hk, "Sq": sq, "Sk": sk, "D": d, "mask": masked}
        visible = mask if masked else torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)
        try:
            out, _ = td.forward(q, k, v, ops, prog)
            grp = hq // hk
            ref = F.scaled_dot_product_attention(q, k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1),
                                                 attn_mask=visible)
            row["max_err_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
            nbytes = (k.numel() + v.numel() + q.numel() + out.numel()) * k.element_size() + \
                (mask.numel() if masked else 0)
            row["bytes"] = nbytes
            if not cpu:
                row["ms"] = common.time_ms(lambda: td.forward(q, k, v, ops, prog), device, target_ms=200)
                row["tb_s"] = nbytes / row["ms"] / 1e9
                row["pct_of_copy"] = 100 * row["tb_s"] / COPY_CEILING_TBS
                sd = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    q, k, v, attn_mask=visible if (masked or sq > 1) else None, enable_gqa=True)
                row["sdpa_ms"] = common.time_ms(sd, device, target_ms=200)
                row["splits"] = td.split_plan(b, hk, sk, device)[0]
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)[:300]
        rows.append(row)
        print("decode kernel", row, flush=True)
    return rows


# --- output ------------------------------------------------------------------------------------------------

def markdown(results, kernel_rows, head) -> list[str]:
    f = common.fmt
    lines = list(head) + ["", "## generate()", "",
                          "Greedy, exactly `new` tokens. decode: (new - 1) tokens over the time beyond a 1-token call. "
                          "equal prefix: leading generated tokens equal to eager+sdpa's (bf16 near-ties may differ).", "",
                          "| run | cache | compile mode | prefill ms | decode ms/token | decode tok/s | end-to-end tok/s | "
                          "graphs (recompiles) | sites | equal prefix | fa3 kernels | notes |", "|" + "---|" * 12]
    for r in results:
        kern = common.kernels_cell(r.get("kernels"))
        graphs = f"{r['graphs']} ({r.get('recompiles', '-')})" if "graphs" in r else "-"
        sites = f"{r['sites_rewritten']}" + (f", {len(r['sites_skipped'])} skipped" if r.get("sites_skipped") else "") \
            if r.get("mode") == "fa3" and "sites_rewritten" in r else "-"
        lines.append(f"| {r['run']} | {r.get('cache', '-')} | {r.get('compile_mode', '-')} | {f(r.get('prefill_ms'), '.1f')} | "
                     f"{f(r.get('decode_ms_per_token'), '.2f')} | {f(r.get('decode_tok_s'), '.0f')} | "
                     f"{f(r.get('e2e_tok_s'), '.0f')} | {graphs} | {sites} | {r.get('tokens_equal_prefix', '-')} | "
                     f"{kern} | {r.get('error') or r.get('skipped') or ''} |")
    if kernel_rows:
        lines += ["", f"## split-KV decode kernel alone (bytes = K + V + q + out (+ mask); copy ceiling "
                      f"{COPY_CEILING_TBS} TB/s)", "",
                  "| B | Hq/Hkv | Sq | Sk | D | mask | splits | ms | TB/s | % of copy | SDPA ms | max err vs SDPA | "
                  "error |", "|" + "---|" * 13]
        for r in kernel_rows:
            lines.append(f"| {r['B']} | {r['Hq']}/{r['Hkv']} | {r['Sq']} | {r['Sk']} | {r['D']} | {r['mask']} | "
                         f"{r.get('splits', '-')} | {f(r.get('ms'), '.4f')} | {f(r.get('tb_s'), '.2f')} | "
                         f"{f(r.get('pct_of_copy'), '.0f')} | {f(r.get('sdpa_ms'), '.4f')} | "
                         f"{f(r.get('max_err_vs_sdpa'), '.2e')} | {r.get('error', '')}".rstrip() + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="tiny model, fp32, on CPU")
    ap.add_argument("--prompt", type=int, default=None, help="prompt length (default 4096; --cpu 24)")
    ap.add_argument("--new", type=int, default=None, help="generated tokens (default 256; --cpu 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 3; --cpu 1)")
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
    models = {}
    g = torch.Generator().manual_seed(1234)
    vocab = 128 if cpu else 32000
    ids = torch.randint(3, vocab, (args.batch, args.prompt), generator=g).to(device)
    results, ref_tokens = [], None
    for name in [REFERENCE_RUN] + [n for n in names if n != REFERENCE_RUN]:
        if name not in names and name != REFERENCE_RUN:
            continue
        if budget.left() <= 0:
            results.append({"run": name, "skipped": "time budget"})
            continue
        impl = RUNS[name][1]
        if impl not in models:   # seeded: the same weights for every implementation
            models[impl] = llama(impl, not cpu, device, dtype)
        try:
            rec = run_one(name, models, ids, args, device, ref_tokens)
            if name == REFERENCE_RUN:
                ref_tokens = rec["_tokens"]
        except Exception as exc:
            traceback.print_exc()
            rec = {"run": name, "error": repr(exc)[:300]}
        rec.pop("_tokens", None)
        if name in names:
            results.append(rec)
        print(name, {k: v for k, v in rec.items() if k not in ("sites_skipped",)}, flush=True)
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
