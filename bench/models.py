"""Model zoo benchmark (issue 6): prefill forwards of unmodified HF models, plain eager vs torch.compile (Inductor)
vs torch.compile(backend="fa3"), for attn_implementation "eager" and "sdpa".

    python bench/models.py [--cpu] [--models llama,llama-s512,bert] [--impls eager,sdpa]
                           [--modes eager,inductor,fa3] [--budget SECONDS] [--out DIR]

Models come from tests/models/zoo.py at its "bench" sizes (GPU: bf16; the first row is the Llama of
shared/ANCHORS.md, 4 layers, hidden 2048, 16 heads x 128, 8 KV heads, B=2, S=8192; "llama-s512" is the same model
at S=512, where launch overhead dominates). --cpu: the zoo's "tiny" sizes in fp32 on CPU, a check of the
script end to end (default models llama, bert; under 2 minutes).

Per (model, attn_implementation, mode): attention sites rewritten / attention calls per forward (fa3), the
output's error vs the same model run eagerly in fp32 (max |out - ref| / max |ref| over defined positions),
median ms, graphs compiled and recompiles during timing, and which fa3 kernel ran the forward. Per model:
speedup of fa3 over the best baseline (fastest of eager / Inductor over both implementations) and over
Inductor with the same implementation. Writes models[_cpu].json / .md / .png (or --stem) under --out
(default bench/results). --budget (seconds, default 420) skips what would start after it, so a run fits one device call.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402

import zoo  # noqa: E402  (tests/models, put on sys.path by common)

MODES = ("eager", "inductor", "fa3")
# with CUDA graphs (mode="reduce-overhead"): where host work dominates (S=512) this is how a user runs it
ALL_MODES = MODES + ("inductor-ro", "fa3-ro")
# (case, zoo model, sequence length override); GPU order is priority order under the budget
CASES = [("llama", "llama", None), ("llama-s512", "llama", 512)] + \
        [(m, m, None) for m in zoo.MODELS if m != "llama"]
CPU_DEFAULT = ["llama", "bert"]
SEQ_KEYS = ("input_ids", "attention_mask")


def case_table():
    return {c: (m, s) for c, m, s in CASES}


def build(case: str, impl: str, size: str, device):
    name, seq = case_table()[case]
    model, inputs, n_calls = zoo.build(name, impl, size=size, dtype=torch.float32, device=device)
    if seq is not None:
        inputs = {k: (v[:, :seq] if k in SEQ_KEYS else v) for k, v in inputs.items()}
    return model, inputs, n_calls


def shape_of(inputs: dict) -> str:
    for k in ("input_ids", "pixel_values", "input_features"):
        if k in inputs:
            t = inputs[k]
            return f"{t.shape[0]}x{t.shape[1]}" if k == "input_ids" else f"{t.shape[0]}x{tuple(t.shape[1:])}"
    return "-"


def cast(inputs: dict, dtype) -> dict:
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def rel_err(out, ref, valid) -> float | None:
    o, r = out.float(), ref.float()
    if valid is not None:
        o, r = o[valid], r[valid]
    if not torch.isfinite(o).all():
        return float("inf")
    return ((o - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()


def run_mode(model, inputs, mode, device, ref, valid) -> dict:
    common.reset_dynamo()
    counter = None
    fn = model
    if mode != "eager":
        counter = common.counting_backend("inductor" if mode.startswith("inductor") else "fa3")
        fn = torch.compile(model, backend=counter, **({"mode": "reduce-overhead"} if mode.endswith("-ro") else {}))
    rec: dict = {"mode": mode}
    before = common.dispatch_snapshot()
    from fa3_inductor import site_choice
    choice_before = dict(site_choice.STATS)
    with torch.no_grad(), common.SiteLog() as sites:
        t0 = time.time()
        out = fn(**inputs)[0]
        common.sync(device)
        rec["first_call_s"] = time.time() - t0
        rec["err"] = rel_err(out, ref, valid)
        del out
        if counter is not None:
            rec["graphs"] = counter.frame_count
            rec["sites_rewritten"] = sites.rewritten
            rec["sites_skipped"] = sites.skipped
        rec["ms"] = common.time_ms(lambda: fn(**inputs), device)
        if counter is not None:
            rec["recompiles"] = counter.frame_count - rec["graphs"]
    if mode.startswith("fa3"):
        rec["kernels"] = common.dispatch_delta(before)
        rec["site_choice"] = {k: v - choice_before.get(k, 0) for k, v in site_choice.STATS.items()
                              if v - choice_before.get(k, 0)}
    return rec


def run_case(case: str, impl: str, modes, device, size: str, dtype, budget) -> list[dict]:
    name = case_table()[case][0]
    model, inputs, n_calls = build(case, impl, size, device)
    valid = zoo.valid_positions(name, inputs)
    base = {"model": case, "impl": impl, "shape": shape_of(inputs), "attention_calls": n_calls,
            "dtype": str(dtype).removeprefix("torch.")}
    with torch.no_grad():
        ref = model(**inputs)[0].float()     # eager fp32: the reference every mode is measured against
    if dtype != torch.float32:
        model = model.to(dtype)
        inputs = cast(inputs, dtype)
    rows = []
    for mode in modes:
        if budget.left() <= 0:
            rows.append({**base, "mode": mode, "skipped": "time budget"})
            continue
        try:
            rec = run_mode(model, inputs, mode, device, ref, valid)
        except Exception as exc:
            traceback.print_exc()
            rec = {"mode": mode, "error": repr(exc)[:300]}
        rows.append({**base, **rec})
        print(line(rows[-1]), flush=True)
        common.free(device)
    del model, ref
    common.free(device)
    return rows


def line(r: dict) -> str:
    tag = f"{r['model']:11s} {r['impl']:5s} {r['mode']:8s}"
    if "error" in r or "skipped" in r:
        return f"{tag} {r.get('error') or r.get('skipped')}"
    extra = ""
    if r["mode"] != "eager":
        extra = f" graphs {r['graphs']} recompiles {r['recompiles']} first call {r['first_call_s']:.1f}s"
    if r["mode"].startswith("fa3"):
        extra += f" sites {r['sites_rewritten']}/{r['attention_calls']} kernels {r.get('kernels')}"
        extra += f" site choice {measure_note(r.get('site_choice'))}"
    return f"{tag} {r['ms']:9.3f} ms  err {r['err']:.2e}{extra}"


def measure_note(stats: dict | None) -> str:
    """The measured site choice's work during the compile (fa3_inductor/site_choice.py STATS delta)."""
    if not stats:
        return "not measured"
    return (f"{stats.get('measured', 0)} measured in {stats.get('seconds', 0.0):.1f} s, {stats.get('cached', 0)} "
            f"cached" + (f", {stats['failed']} failed" if stats.get("failed") else ""))


def summarize(results: list[dict]) -> list[dict]:
    """One row per (model, impl): the three modes side by side, speedups of fa3."""
    rows = []
    by_model: dict = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    for model, recs in by_model.items():
        timed = [r for r in recs if "ms" in r]
        baselines = [r["ms"] for r in timed if not r["mode"].startswith("fa3")]
        best = min(baselines) if baselines else None
        for impl in dict.fromkeys(r["impl"] for r in recs):
            m = {r["mode"]: r for r in recs if r["impl"] == impl}
            fa3 = m.get("fa3", {})
            ind = m.get("inductor", {})
            row = {"model": model, "impl": impl, "shape": recs[0]["shape"], "best_baseline_ms": best}
            for mode in ALL_MODES:
                row[f"{mode}_ms"] = m.get(mode, {}).get("ms")
                row[f"{mode}_err"] = m.get(mode, {}).get("err")
            if row["fa3-ro_ms"] and row["inductor-ro_ms"]:
                row["ro_speedup_vs_inductor_ro"] = row["inductor-ro_ms"] / row["fa3-ro_ms"]
            if "ms" in fa3:
                row["sites"] = f"{fa3.get('sites_rewritten')}/{fa3.get('attention_calls')}"
                row["speedup_vs_best"] = best / fa3["ms"] if best else None
                row["speedup_vs_inductor"] = ind["ms"] / fa3["ms"] if "ms" in ind else None
                row["fa3_graphs"] = fa3.get("graphs")
                row["fa3_recompiles"] = fa3.get("recompiles")
                row["fa3_kernels"] = fa3.get("kernels")
                row["fa3_skipped"] = fa3.get("sites_skipped")
                row["fa3_site_choice"] = fa3.get("site_choice")
            row["notes"] = "; ".join(f"{k}: {v.get('error') or v.get('skipped')}" for k, v in m.items()
                                     if "error" in v or "skipped" in v)
            if "ms" in fa3:
                row["notes"] += ("; " if row["notes"] else "") + "site choice: " + measure_note(fa3.get("site_choice"))
            rows.append(row)
    return rows


def skipped_summary(lines: list[str]) -> str:
    """The fa3 log's "fa3 skipped: <reason> [<site>] <spelling>" lines as one entry per distinct reason with its
    number of sites ("6 sites: <reason>"); the site names stay in the JSON (fa3_skipped)."""
    counts: dict = {}
    for ln in lines:
        m = re.match(r"fa3 skipped: (.*?) \[[^\]]*\]", ln)
        reason = m.group(1) if m else ln
        counts[reason] = counts.get(reason, 0) + 1
    return " | ".join(f"{n} site{'s' if n > 1 else ''}: {reason}" for reason, n in counts.items())


def markdown(summary: list[dict], header_lines: list[str]) -> list[str]:
    f = common.fmt
    lines = list(header_lines) + [
        "", "ms: median prefill forward; err: max |out - eager fp32| / max |eager fp32| over defined positions; "
        "speedups of fa3 over the fastest baseline (eager or Inductor, either implementation) and over Inductor "
        "with the same implementation; graphs (recompiles during timing) of the fa3 compile. -ro: both compiled "
        "with mode=\"reduce-overhead\" (CUDA graphs), where they ran.", "",
        "| model | impl | shape | sites | eager ms | inductor ms | fa3 ms | fa3 vs best | fa3 vs inductor | "
        "inductor-ro ms | fa3-ro ms | fa3-ro vs inductor-ro | "
        "err eager | err inductor | err fa3 | graphs (recompiles) | fa3 kernels | notes |",
        "|" + "---|" * 18]
    for r in summary:
        kern = ", ".join(f"{k}×{v}" for k, v in (r.get("fa3_kernels") or {}).items())
        graphs = f"{r['fa3_graphs']} ({r['fa3_recompiles']})" if r.get("fa3_graphs") is not None else "-"
        skipped = "skipped: " + skipped_summary(r["fa3_skipped"]) if r.get("fa3_skipped") else ""
        notes = "; ".join(x for x in (r["notes"], skipped) if x)
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['shape']} | {r.get('sites', '-')} | {f(r['eager_ms'], '.2f')} | "
            f"{f(r['inductor_ms'], '.2f')} | {f(r['fa3_ms'], '.2f')} | {f(r.get('speedup_vs_best'), '.2f')} | "
            f"{f(r.get('speedup_vs_inductor'), '.2f')} | {f(r.get('inductor-ro_ms'), '.2f')} | "
            f"{f(r.get('fa3-ro_ms'), '.2f')} | {f(r.get('ro_speedup_vs_inductor_ro'), '.2f')} | "
            f"{f(r['eager_err'], '.1e')} | {f(r['inductor_err'], '.1e')} | "
            f"{f(r['fa3_err'], '.1e')} | {graphs} | {kern or '-'} | {notes or ''} |")
    return lines


def plot(summary: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"no plot: {exc}")
        return
    rows = [r for r in summary if r.get("best_baseline_ms")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    width = 0.27
    for n, mode in enumerate(MODES):
        ys = [(r["best_baseline_ms"] / r[f"{mode}_ms"]) if r.get(f"{mode}_ms") else 0 for r in rows]
        ax.bar([x + n * width for x in range(len(rows))], ys, width, label=mode)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks([x + width for x in range(len(rows))])
    ax.set_xticklabels([f"{r['model']}\n{r['impl']}" for r in rows], fontsize=7)
    ax.set_ylabel("speed vs best baseline (higher is faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="tiny models, fp32, on CPU")
    ap.add_argument("--models", default=None, help=f"comma-separated cases of {[c for c, _, _ in CASES]}")
    ap.add_argument("--impls", default="eager,sdpa")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {ALL_MODES}")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later work is skipped")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    ap.add_argument("--stem", default=None, help="result file names (default models / models_cpu)")
    args = ap.parse_args(argv)
    device = common.pick_device(args.cpu)
    size, dtype = ("tiny", torch.float32) if device.type == "cpu" else ("bench", torch.bfloat16)
    cases = args.models.split(",") if args.models else (CPU_DEFAULT if device.type == "cpu" else
                                                          [c for c, _, _ in CASES])
    unknown = [c for c in cases if c not in case_table()]
    if unknown:
        ap.error(f"unknown models {unknown}")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ALL_MODES for m in modes):
        ap.error(f"modes must be among {ALL_MODES}")
    budget = common.Budget(args.budget)
    head = common.header("HF model zoo: prefill", device)
    print("\n".join(head), flush=True)
    stem = args.stem or ("models" if device.type == "cuda" else "models_cpu")
    results = []
    for case in cases:
        for impl in args.impls.split(","):
            if impl not in zoo.supported_impls(case_table()[case][0]):
                continue
            if budget.left() <= 0:
                results.append({"model": case, "impl": impl, "shape": "-", "mode": "eager", "skipped": "time budget"})
                continue
            try:
                results += run_case(case, impl, modes, device, size, dtype, budget)
            except Exception as exc:   # building the model failed (missing weights, out of memory)
                traceback.print_exc()
                results.append({"model": case, "impl": impl, "shape": "-", "mode": "eager", "error": repr(exc)[:300]})
            summary = summarize(results)
            head_now = head + [f"elapsed {budget.elapsed():.0f} s of a {args.budget:.0f} s budget"]
            common.write_results(args.out, stem, head_now, results, markdown(summary, head_now),
                                 {"summary": summary})
    summary = summarize(results)
    plot(summary, os.path.join(args.out, f"{stem}.png"))
    print("\n".join(markdown(summary, head + [f"elapsed {budget.elapsed():.0f} s"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
