"""Model zoo benchmark (issue 6): prefill forwards of unmodified HF models, plain eager vs torch.compile (Inductor)
vs torch.compile(backend="fa3"), for attn_implementation "eager" and "sdpa".

    python bench/models.py [--cpu] [--models llama,llama-s512,bert] [--impls eager,sdpa]
                           [--modes eager,inductor,fa3[,fa3-fp8]] [--rounds 5] [--round-ms MS] [--budget SECONDS] [--out DIR]

Models come from tests/models/zoo.py at its "bench" sizes (GPU: bf16; the first row is the Llama of
shared/ANCHORS.md, 4 layers, hidden 2048, 16 heads x 128, 8 KV heads, B=2, S=8192; "llama-s512" is the same model
at S=512, where launch overhead dominates). --cpu: the zoo's "tiny" sizes in fp32 on CPU (one thread), a check of
the script end to end (default models llama, bert; about a minute).

Timing: the host drifts within a process (bench/decode_host.py), so modes timed one after the other are biased.
Per model, every (attn_implementation, mode) is compiled first, each through its own code object (its own
Dynamo cache), and all are held at once: the compiled modes share the model's weights and hold no activations
(reduce-overhead modes share one CUDA graph pool), so this takes no more memory than one mode at a time. Then
--rounds rounds each time every variant (a warmup call, then the median of calls filling ~--round-ms) in an
order rotated per round; a mode's time is the median over rounds, with [min, max] as its noise.

Per (model, attn_implementation, mode): attention sites rewritten / attention calls per forward (fa3), the
output's error vs the same model run eagerly in fp32 (max |out - ref| / max |ref| over defined positions),
ms (median [min, max] over rounds), graphs compiled and recompiles during timing, and which fa3 kernel ran the
forward. Mode fa3-fp8 (not in the default modes) is the fa3 backend with options={"fp8": True}: issue 5's end-to-end
FP8 row, its output's error (also as relative RMS) and time beside bf16 fa3 in a table of its own. Per model:
speedup of fa3 (ratio of medians) over the best baseline (fastest of eager / Inductor over
both implementations) and over Inductor with the same implementation, each marked "within noise" where the two
[min, max] ranges overlap. Writes models[_cpu].json / .md / .png (or --stem) under --out (default
bench/results). --budget (seconds, default 420) skips what would start after it (compiles, and rounds after the
first), so a run fits one device call.
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
ALL_MODES = MODES + ("inductor-ro", "fa3-ro", "fa3-fp8")
# fa3-fp8: the fa3 backend with options={"fp8": True} (issue 5's end-to-end row: logits error and time vs bf16 fa3)
FP8_OPTIONS = {"fp8": True}
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


def _defined(out, ref, valid):
    """(out, ref) in fp32 at the defined positions, or None where out is not finite there."""
    o, r = out.float(), ref.float()
    if valid is not None:
        o, r = o[valid], r[valid]
    return (o, r) if torch.isfinite(o).all() else None


def rel_err(out, ref, valid) -> float | None:
    d = _defined(out, ref, valid)
    return float("inf") if d is None else ((d[0] - d[1]).abs().max() / d[1].abs().max().clamp_min(1e-6)).item()


def rms_err(out, ref, valid) -> float | None:
    """||out - ref|| / ||ref|| over defined positions: the whole output's error, where the max-based err is set by
    its single worst position (the FP8 row compares both against bf16)."""
    d = _defined(out, ref, valid)
    return float("inf") if d is None else ((d[0] - d[1]).norm() / d[1].norm().clamp_min(1e-12)).item()


class Variant:
    """One (attn implementation, mode) of a model: compiled through its own code object (its own Dynamo cache),
    called once for its error and compile record, then timed once per round, interleaved with the other
    variants of the model."""

    def __init__(self, base: dict, mode: str, model, inputs, device, ref, valid):
        self.base, self.mode, self.model, self.inputs, self.device = base, mode, model, inputs, device
        self.ref, self.valid = ref, valid
        self.rec: dict = {"mode": mode}
        self.fn = None
        self.counter = None
        self.kernels = common.DispatchCount()   # every call of this variant: compile, warmup and timed
        self.round_ms: list[float] = []

    def compile(self) -> None:
        fn = self.model
        if self.mode != "eager":
            self.counter = common.counting_backend("inductor" if self.mode.startswith("inductor") else "fa3")
            kw = {"mode": "reduce-overhead"} if self.mode.endswith("-ro") else {}
            if self.mode == "fa3-fp8":
                kw = {"options": dict(FP8_OPTIONS)}
            fn = torch.compile(common.own_code(self.model, f"models {self.base['impl']} {self.mode}"),
                               backend=self.counter, **kw)
        from fa3_inductor import site_choice
        choice_before = dict(site_choice.STATS)
        with torch.no_grad(), common.SiteLog() as sites, self.kernels.counting():
            t0 = time.time()
            out = fn(**self.inputs)[0]
            common.sync(self.device)
            self.rec["first_call_s"] = time.time() - t0
            self.rec["err"] = rel_err(out, self.ref, self.valid)
            self.rec["rms_err"] = rms_err(out, self.ref, self.valid)
            del out
        if self.counter is not None:
            self.rec["graphs"] = self.counter.frame_count
            self.rec["sites_rewritten"] = sites.rewritten
            self.rec["sites_skipped"] = sites.skipped
        if self.mode.startswith("fa3"):
            self.rec["site_choice"] = {k: v - choice_before.get(k, 0) for k, v in site_choice.STATS.items()
                                       if v - choice_before.get(k, 0)}
        self.fn = fn

    def time_round(self, target_ms: float, max_reps: int) -> None:
        """One warmup call (the first after another variant ran), then the median of a few timed calls."""
        if "error" in self.rec:
            return
        try:
            with torch.no_grad(), self.kernels.counting():
                self.fn(**self.inputs)
                self.round_ms.append(common.time_ms(lambda: self.fn(**self.inputs), self.device, target_ms=target_ms,
                                                    max_reps=max_reps))
        except Exception as exc:
            traceback.print_exc()
            self.rec["error"] = repr(exc)[:300]

    def record(self) -> dict:
        rec = dict(self.rec)
        if self.round_ms and "error" not in rec:
            sp = common.spread(self.round_ms)
            rec.update(ms=sp["median"], ms_min=sp["min"], ms_max=sp["max"], ms_rounds=list(self.round_ms))
            if self.counter is not None:
                rec["recompiles"] = self.counter.frame_count - rec["graphs"]
        if self.mode.startswith("fa3") and "err" in rec:
            rec["kernels"] = dict(self.kernels.counts)
        return {**self.base, **rec}

    def release(self) -> None:
        self.fn = self.model = self.inputs = self.ref = None


def run_case(case: str, impls, modes, device, size: str, dtype, budget, args) -> list[dict]:
    """Every (impl, mode) of one model compiled first, all held at once (the compiled modes share the model's
    weights; reduce-overhead modes share one CUDA graph pool), then timed in args.rounds rotated rounds: the
    speedups against the best baseline over both implementations compare times taken side by side."""
    name = case_table()[case][0]
    common.reset_dynamo()
    # frames past a graph break are shared by every variant (the same model classes): room for all their entries
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(impls) * len(modes))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    variants: list[Variant] = []
    rows: list[dict] = []
    for impl in impls:
        if budget.left() <= 0:
            rows.append({"model": case, "impl": impl, "shape": "-", "mode": "eager", "skipped": "time budget"})
            continue
        try:
            model, inputs, n_calls = build(case, impl, size, device)
            valid = zoo.valid_positions(name, inputs)
            with torch.no_grad():
                ref = model(**inputs)[0].float()     # eager fp32: the reference every mode is measured against
            if dtype != torch.float32:
                model = model.to(dtype)
                inputs = cast(inputs, dtype)
        except Exception as exc:   # building the model failed (missing weights, out of memory)
            traceback.print_exc()
            rows.append({"model": case, "impl": impl, "shape": "-", "mode": "eager", "error": repr(exc)[:300]})
            continue
        base = {"model": case, "impl": impl, "shape": shape_of(inputs), "attention_calls": n_calls,
                "dtype": str(dtype).removeprefix("torch.")}
        for mode in modes:
            v = Variant(base, mode, model, inputs, device, ref, valid)
            variants.append(v)
            if budget.left() <= 0:
                v.rec["skipped"] = "time budget"
                continue
            try:
                v.compile()
            except Exception as exc:
                traceback.print_exc()
                v.rec["error"] = repr(exc)[:300]
            print(line(v.record(), compiled=True), flush=True)
        del model, inputs, ref
    timed = [v for v in variants if v.fn is not None]
    done = common.rotated_rounds(timed, args.rounds, lambda v: v.time_round(args.round_ms, args.max_reps), budget)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    for v in variants:
        row = v.record()
        if v.fn is not None:
            row.update(rounds=done, rounds_asked=args.rounds, peak_gpu_gib=peak)
        rows.append(row)
        print(line(row), flush=True)
        v.release()
    common.free(device)
    return rows


def line(r: dict, compiled: bool = False) -> str:
    tag = f"{r['model']:11s} {r['impl']:5s} {r['mode']:8s}"
    if "error" in r or "skipped" in r:
        return f"{tag} {r.get('error') or r.get('skipped')}"
    extra = ""
    if r["mode"] != "eager":
        extra = f" graphs {r['graphs']}" + ("" if compiled else f" recompiles {r['recompiles']}") + \
            f" first call {r['first_call_s']:.1f}s"
    if r["mode"].startswith("fa3"):
        extra += f" sites {r['sites_rewritten']}/{r['attention_calls']}"
        extra += "" if compiled else f" kernels {r.get('kernels')}"
        extra += f" site choice {measure_note(r.get('site_choice'))}"
    if compiled:
        return f"{tag} {'first call' if r['mode'] == 'eager' else 'compiled'}  err {r['err']:.2e}{extra}"
    return (f"{tag} {r['ms']:9.3f} ms [{r['ms_min']:.3f}, {r['ms_max']:.3f}] over {r['rounds']} rounds  "
            f"err {r['err']:.2e}{extra}")


def measure_note(stats: dict | None) -> str:
    """The measured site choice's work during the compile (fa3_inductor/site_choice.py STATS delta)."""
    if not stats:
        return "not measured"
    return (f"{stats.get('measured', 0)} measured in {stats.get('seconds', 0.0):.1f} s, {stats.get('cached', 0)} "
            f"cached" + (f", {stats['failed']} failed" if stats.get("failed") else ""))


def timing(r: dict) -> tuple | None:
    """(median, min, max) ms over rounds of a result row, None where it was not timed."""
    return (r["ms"], r["ms_min"], r["ms_max"]) if "ms" in r else None


def summarize(results: list[dict]) -> list[dict]:
    """One row per (model, impl): the modes side by side (median [min, max] over rounds), speedups of fa3 from the
    medians, and whether fa3's spread overlaps the baseline's ("within noise") or not ("faster" / "slower")."""
    rows = []
    by_model: dict = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    for model, recs in by_model.items():
        baselines = [r for r in recs if "ms" in r and not r["mode"].startswith("fa3")]
        best = min(baselines, key=lambda r: r["ms"]) if baselines else None
        for impl in dict.fromkeys(r["impl"] for r in recs):
            m = {r["mode"]: r for r in recs if r["impl"] == impl}
            fa3 = m.get("fa3", {})
            ind = m.get("inductor", {})
            row = {"model": model, "impl": impl, "shape": recs[0]["shape"],
                   "best_baseline_ms": best["ms"] if best else None,
                   "best_baseline": f"{best['impl']} {best['mode']}" if best else None,
                   "best_baseline_timing": timing(best) if best else None,
                   "rounds": next((r["rounds"] for r in m.values() if "rounds" in r), None),
                   "rounds_asked": next((r["rounds_asked"] for r in m.values() if "rounds_asked" in r), None),
                   "peak_gpu_gib": next((r["peak_gpu_gib"] for r in m.values() if "peak_gpu_gib" in r), None)}
            for mode in ALL_MODES:
                row[f"{mode}_ms"] = m.get(mode, {}).get("ms")
                row[f"{mode}_timing"] = timing(m.get(mode, {}))
                row[f"{mode}_err"] = m.get(mode, {}).get("err")
                row[f"{mode}_rms_err"] = m.get(mode, {}).get("rms_err")
            if row["fa3-ro_ms"] and row["inductor-ro_ms"]:
                row["ro_speedup_vs_inductor_ro"] = row["inductor-ro_ms"] / row["fa3-ro_ms"]
                row["ro_vs_inductor_ro_resolved"] = common.versus(row["fa3-ro_timing"], row["inductor-ro_timing"])
            if "ms" in fa3:
                row["sites"] = f"{fa3.get('sites_rewritten')}/{fa3.get('attention_calls')}"
                row["speedup_vs_best"] = best["ms"] / fa3["ms"] if best else None
                row["vs_best_resolved"] = common.versus(timing(fa3), timing(best)) if best else None
                row["speedup_vs_inductor"] = ind["ms"] / fa3["ms"] if "ms" in ind else None
                row["vs_inductor_resolved"] = common.versus(timing(fa3), timing(ind)) if "ms" in ind else None
                row["fa3_graphs"] = fa3.get("graphs")
                row["fa3_recompiles"] = fa3.get("recompiles")
                row["fa3_kernels"] = fa3.get("kernels")
                row["fa3_skipped"] = fa3.get("sites_skipped")
                row["fa3_site_choice"] = fa3.get("site_choice")
            fp8 = m.get("fa3-fp8", {})
            if "ms" in fp8:
                row["fp8_sites"] = f"{fp8.get('sites_rewritten')}/{fp8.get('attention_calls')}"
                row["fp8_kernels"] = fp8.get("kernels")
                if "ms" in fa3:
                    row["fp8_speedup_vs_fa3"] = fa3["ms"] / fp8["ms"]
                    row["fp8_vs_fa3_resolved"] = common.versus(timing(fp8), timing(fa3))
            notes = [f"{k}: {v.get('error') or v.get('skipped')}" for k, v in m.items()
                     if "error" in v or "skipped" in v]
            if row["rounds"] is not None and row["rounds"] < row["rounds_asked"]:
                notes.append(f"{row['rounds']} of {row['rounds_asked']} rounds (time budget)")
            if "ms" in fa3:
                notes.append("site choice: " + measure_note(fa3.get("site_choice")))
            if row["peak_gpu_gib"] is not None:
                notes.append(f"peak GPU memory {row['peak_gpu_gib']:.1f} GiB (all modes held)")
            row["notes"] = "; ".join(notes)
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


def spread_cell(t: tuple | None) -> str:
    return "-" if t is None else f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"


def markdown(summary: list[dict], header_lines: list[str]) -> list[str]:
    f = common.fmt
    lines = list(header_lines) + [
        "", "ms: prefill forward, median [min, max] over rounds: per model, every (impl, mode) is compiled first and "
        "held, then each round times every one of them (a warmup call, then the median of a few calls) in an order "
        "rotated per round, so drift of the host within the process falls on all modes alike. err: max |out - "
        "eager fp32| / max |eager fp32| over defined positions; speedups of fa3 (ratios of medians) over the "
        "fastest baseline (eager or Inductor, either implementation: best baseline) and over Inductor with the same "
        "implementation; resolved: \"within noise\" where fa3's [min, max] overlaps the baseline's, else faster / "
        "slower; graphs (recompiles during timing) of the fa3 compile. -ro: both compiled with "
        "mode=\"reduce-overhead\" (CUDA graphs), where they ran.", "",
        "| model | impl | shape | sites | eager ms | inductor ms | fa3 ms | best baseline | fa3 vs best | resolved | "
        "fa3 vs inductor | resolved | inductor-ro ms | fa3-ro ms | fa3-ro vs inductor-ro | "
        "err eager | err inductor | err fa3 | graphs (recompiles) | fa3 kernels | notes |",
        "|" + "---|" * 21]
    for r in summary:
        kern = common.kernels_cell(r.get("fa3_kernels"))
        graphs = f"{r['fa3_graphs']} ({r['fa3_recompiles']})" if r.get("fa3_graphs") is not None else "-"
        skipped = "skipped: " + skipped_summary(r["fa3_skipped"]) if r.get("fa3_skipped") else ""
        notes = "; ".join(x for x in (r["notes"], skipped) if x)
        best = f"{r['best_baseline']} {spread_cell(r['best_baseline_timing'])}" if r.get("best_baseline") else "-"
        ro = f(r.get("ro_speedup_vs_inductor_ro"), ".2f")
        if r.get("ro_vs_inductor_ro_resolved"):
            ro += f" ({r['ro_vs_inductor_ro_resolved']})"
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['shape']} | {r.get('sites', '-')} | {spread_cell(r['eager_timing'])} | "
            f"{spread_cell(r['inductor_timing'])} | {spread_cell(r['fa3_timing'])} | {best} | "
            f"{f(r.get('speedup_vs_best'), '.2f')} | {r.get('vs_best_resolved') or '-'} | "
            f"{f(r.get('speedup_vs_inductor'), '.2f')} | {r.get('vs_inductor_resolved') or '-'} | "
            f"{spread_cell(r.get('inductor-ro_timing'))} | {spread_cell(r.get('fa3-ro_timing'))} | {ro} | "
            f"{f(r['eager_err'], '.1e')} | {f(r['inductor_err'], '.1e')} | "
            f"{f(r['fa3_err'], '.1e')} | {graphs} | {kern} | {notes or ''} |")
    return lines + fp8_markdown(summary)


def fp8_markdown(summary: list[dict]) -> list[str]:
    """FP8 end to end (rows with a timed fa3-fp8 mode): the fa3 backend with options={"fp8": True} beside bf16 fa3
    in the same rounds, both outputs' errors against eager fp32 (max-based and relative RMS)."""
    rows = [r for r in summary if r.get("fa3-fp8_timing")]
    if not rows:
        return []
    f = common.fmt
    lines = ["", "FP8 end to end: fa3-fp8 is torch.compile(backend=\"fa3\", options={\"fp8\": True}) (block scales + "
             "Hadamard, the default recipe), timed in the same rotated rounds as the modes above; err: max-based as "
             "above, rms: ||out - eager fp32|| / ||eager fp32||.", "",
             "| model | impl | shape | fp8 sites | fa3 ms | fa3-fp8 ms | fp8 vs fa3 | resolved | err fa3 | err fa3-fp8 | "
             "rms fa3 | rms fa3-fp8 | rms inductor | fa3-fp8 kernels |", "|" + "---|" * 14]
    for r in rows:
        kern = common.kernels_cell(r.get("fp8_kernels"))
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['shape']} | {r.get('fp8_sites', '-')} | "
            f"{spread_cell(r.get('fa3_timing'))} | {spread_cell(r['fa3-fp8_timing'])} | "
            f"{f(r.get('fp8_speedup_vs_fa3'), '.2f')} | {r.get('fp8_vs_fa3_resolved') or '-'} | "
            f"{f(r.get('fa3_err'), '.1e')} | {f(r.get('fa3-fp8_err'), '.1e')} | {f(r.get('fa3_rms_err'), '.1e')} | "
            f"{f(r.get('fa3-fp8_rms_err'), '.1e')} | {f(r.get('inductor_rms_err'), '.1e')} | {kern} |")
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
    ap.add_argument("--rounds", type=int, default=5, help="rotated timing rounds per model (default 5)")
    ap.add_argument("--round-ms", type=float, default=None,
                    help="timed calls per mode and round: about this many ms (default 100; --cpu 30)")
    ap.add_argument("--max-reps", type=int, default=20, help="at most this many timed calls per mode and round")
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
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if device.type == "cpu":
        torch.set_num_threads(1)    # Inductor's OpenMP kernels on a shared 2-core host: barriers stall for ms
    args.round_ms = args.round_ms or (30.0 if device.type == "cpu" else 100.0)
    budget = common.Budget(args.budget)
    head = common.header(f"HF model zoo: prefill, {args.rounds} rotated rounds of ~{args.round_ms:.0f} ms per mode",
                         device)
    print("\n".join(head), flush=True)
    stem = args.stem or ("models" if device.type == "cuda" else "models_cpu")
    results = []
    for case in cases:
        impls = [i for i in args.impls.split(",") if i in zoo.supported_impls(case_table()[case][0])]
        if budget.left() <= 0:
            results += [{"model": case, "impl": i, "shape": "-", "mode": "eager", "skipped": "time budget"}
                        for i in impls]
        else:
            results += run_case(case, impls, modes, device, size, dtype, budget, args)
        summary = summarize(results)
        head_now = head + [f"elapsed {budget.elapsed():.0f} s of a {args.budget:.0f} s budget"]
        common.write_results(args.out, stem, head_now, results, markdown(summary, head_now), {"summary": summary})
    summary = summarize(results)
    plot(summary, os.path.join(args.out, f"{stem}.png"))
    print("\n".join(markdown(summary, head + [f"elapsed {budget.elapsed():.0f} s"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
