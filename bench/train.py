"""Training benchmark (issue 6): one AdamW step (forward, backward, optimizer) of a Llama-style LM and of BERT with
padded batches, bf16 weights, compiled with backend="fa3" vs Inductor; loss and gradients against an fp32 eager
reference, step time, and which kernel ran the attention backward.

    python bench/train.py [--cpu] [--models llama,bert] [--impls sdpa,eager] [--modes inductor,fa3]
                          [--seq N] [--steps N] [--rounds 5] [--round-ms MS] [--budget SECONDS] [--out DIR]

llama: the ANCHORS.md model (4 layers, hidden 2048, 16 heads x 128, 8 KV heads), B=2, S=4096 (--seq), loss =
causal LM cross-entropy. bert: the zoo's BERT-large-shaped encoder (4 layers, 16 heads x 64), B=16, S=512, rows
right-padded to random lengths in [S/4, S], loss = a fixed random projection of the last hidden state over real
tokens. Dropout is set to 0 (active dropout is left to eager/Inductor by design, and would make steps
incomparable). --cpu: the zoo's tiny models in fp32, one thread (the script end to end).

Timing: every mode gets its own bf16 copy of the model and optimizer, is compiled (its own code object: its own
Dynamo cache) and takes its first step (the accuracy rule's) before any is timed; then --rounds rounds each time
every mode (a warmup step, then the median of at least --steps steps filling ~--round-ms) in an order rotated per
round, since the host drifts within a process (bench/decode_host.py). Step time: median [min, max] over rounds.

Accuracy rule, per model: for the loss and for every parameter's gradient, the error vs fp32 eager of the fa3 step
(relative: |a - ref| / |ref| for the loss, ||g - g_ref|| / ||g_ref|| per parameter, worst parameter reported,
with 1e-3 of the largest gradient norm as the floor of ||g_ref||)
must be within 2x Inductor's error in the same dtype plus 1e-3. The fa3 run must execute the Triton backward
on a GPU (dispatch counts of fa3_inductor.dispatch). Writes train[_cpu].json / .md under --out.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch  # noqa: E402

import zoo  # noqa: E402

MODELS = ("llama", "bert")
GUARD = 1e-3


def build(name: str, impl: str, cpu: bool, seq: int | None, device):
    """fp32 model in train mode with dropout off, inputs, and loss_fn(model_or_compiled, inputs) -> scalar."""
    size = "tiny" if cpu else "bench"
    if name == "llama":
        model, inputs, _ = zoo.build("llama", impl, size=size, device=device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if not cpu:
            ids = ids[:, :seq or 4096].contiguous()
            mask = torch.ones_like(ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

        def loss_fn(m, b):
            return m(**b, labels=labels, use_cache=False).loss
    else:
        model, inputs, _ = zoo.build("bert", impl, size=size, device=device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if not cpu:   # right padding: random lengths in [S/4, S]
            g = torch.Generator().manual_seed(5)
            s = ids.shape[1]
            lengths = torch.randint(s // 4, s + 1, (ids.shape[0],), generator=g)
            lengths[0] = s
            mask = (torch.arange(s)[None, :] < lengths[:, None]).long().to(device)
            ids = ids.masked_fill(mask == 0, 0)
        batch = {"input_ids": ids, "attention_mask": mask}
        g = torch.Generator().manual_seed(6)
        weight = torch.randn(*ids.shape, model.config.hidden_size, generator=g).to(device)
        weight = weight * mask[..., None].float() / mask.sum()

        def loss_fn(m, b):
            return (m(**b).last_hidden_state.float() * weight).sum()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    model.train()
    return model, batch, loss_fn


def grads_of(model) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(grads: dict, ref: dict) -> tuple[float, str, float]:
    """(worst per-parameter relative error, its name, relative error of all gradients together).

    A gradient that is zero in exact arithmetic (BERT's key bias: softmax ignores a per-row constant) is pure
    rounding noise in every run; its error is measured against 1e-3 of the largest gradient norm instead."""
    norms = {n: r.norm().item() for n, r in ref.items()}
    floor = 1e-3 * max(norms.values(), default=0.0)
    worst, name, num, den = 0.0, "", 0.0, 0.0
    for n, r in ref.items():
        g = grads.get(n)
        d = (g - r).norm().item() if g is not None else norms[n]
        num, den = num + d * d, den + norms[n] ** 2
        e = d / max(norms[n], floor, 1e-30)
        if e > worst:
            worst, name = e, n
    return worst, name, (num ** 0.5) / max(den ** 0.5, 1e-30)


class Trainer:
    """One mode's bf16 copy of the model with its optimizer, compiled through its own code object (its own
    Dynamo cache); its first step is measured against the fp32 reference, later steps are timed in rounds."""

    def __init__(self, base: dict, mode: str, model32, batch, loss_fn, dtype, device):
        self.base, self.mode, self.batch, self.loss_fn, self.device = base, mode, batch, loss_fn, device
        self.model = copy.deepcopy(model32).to(dtype)
        self.counter = common.counting_backend("inductor" if mode == "inductor" else "fa3")
        self.fn = self.model if mode == "eager" else \
            torch.compile(common.own_code(self.model, f"train {base['model']} {base['impl']} {mode}"),
                          backend=self.counter)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, foreach=True)
        self.kernels = common.DispatchCount()   # every step of this mode: first, warmup and timed
        self.rec: dict = {"mode": mode}
        self.step_ms: list[float] = []

    def first_step(self, ref_loss, ref_grads) -> None:
        rec = self.rec
        with self.kernels.counting():
            t0 = time.time()
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.fn, self.batch)
            loss.backward()
            common.sync(self.device)
            rec["first_step_s"] = time.time() - t0
            rec["loss"] = loss.item()
            rec["loss_err"] = abs(rec["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
            rec["grad_err_worst"], rec["grad_err_worst_param"], rec["grad_err_all"] = \
                grad_errors(grads_of(self.model), ref_grads)
            self.opt.step()
        if self.mode != "eager":
            rec["graphs"] = self.counter.frame_count

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss_fn(self.fn, self.batch).backward()
        self.opt.step()

    def time_round(self, target_ms: float, steps: int) -> None:
        """One warmup step (the first after another mode ran), then the median of at least `steps` steps."""
        if "error" in self.rec:
            return
        try:
            with self.kernels.counting():
                self.step()
                self.step_ms.append(common.time_ms(self.step, self.device, target_ms=target_ms, min_reps=steps,
                                                   max_reps=max(steps, 10)))
        except Exception as exc:
            traceback.print_exc()
            self.rec["error"] = repr(exc)[:300]

    def record(self) -> dict:
        rec = dict(self.rec)
        if self.step_ms and "error" not in rec:
            sp = common.spread(self.step_ms)
            rec.update(step_ms=sp["median"], step_ms_min=sp["min"], step_ms_max=sp["max"],
                       step_ms_rounds=list(self.step_ms))
            if self.mode != "eager":
                rec["recompiles"] = self.counter.frame_count - rec["graphs"]
        if self.mode == "fa3" and "loss" in rec:
            rec["kernels"] = dict(self.kernels.counts)
        return {**self.base, **rec}

    def release(self) -> None:
        self.model = self.opt = self.fn = None


def run_case(name, impl, modes, args, device, dtype) -> list[dict]:
    """Every mode compiled and stepped once first (its own model copy and optimizer, all held), then timed in
    args.rounds rounds in an order rotated per round: host drift within the process falls on all modes alike."""
    model32, batch, loss_fn = build(name, impl, device.type == "cpu", args.seq, device)
    shape = "x".join(map(str, batch["input_ids"].shape))
    pad = 1.0 - batch["attention_mask"].float().mean().item()
    base = {"model": name, "impl": impl, "shape": shape, "padding": round(pad, 3), "dtype": str(dtype)[6:]}
    model32.zero_grad(set_to_none=True)
    ref_loss_t = loss_fn(model32, batch)
    ref_loss_t.backward()
    ref_loss, ref_grads = ref_loss_t.item(), grads_of(model32)
    model32.zero_grad(set_to_none=True)
    del ref_loss_t
    common.reset_dynamo()
    trainers: list[Trainer] = []
    rows = []
    for mode in modes:
        if args.budget_obj.left() <= 0:
            rows.append({**base, "mode": mode, "skipped": "time budget"})
            continue
        t = None
        try:
            t = Trainer(base, mode, model32, batch, loss_fn, dtype, device)
            t.first_step(ref_loss, ref_grads)
            trainers.append(t)
        except Exception as exc:
            traceback.print_exc()
            rows.append({**base, "mode": mode, "error": repr(exc)[:300]})
            if t is not None:
                t.release()
            common.free(device)
            continue
        print(f"{name:6s} {impl:5s} {mode:8s} first step {t.rec['first_step_s']:.1f}s  loss {t.rec['loss']:.5g}",
              flush=True)
    if args.on_row:     # the first steps' accuracy survives a stage cut short during the rounds
        args.on_row(rows + [t.record() for t in trainers])
    done = common.rotated_rounds(trainers, args.rounds, lambda t: t.time_round(args.round_ms, args.steps),
                                 args.budget_obj)
    for t in trainers:
        row = t.record()
        if "step_ms" in row:
            row.update(rounds=done, rounds_asked=args.rounds)
        rows.append(row)
        print(line(rows[-1]), flush=True)
        t.release()
    rows.sort(key=lambda r: modes.index(r["mode"]))
    if args.on_row:
        args.on_row(rows)
    verdict(rows, device)
    del model32, ref_grads
    common.free(device)
    return rows


def verdict(rows, device) -> None:
    """Mark the fa3 row: accuracy within 2x Inductor's + guard, and the attention backward on the Triton kernel."""
    m = {r["mode"]: r for r in rows}
    fa3, ind = m.get("fa3"), m.get("inductor")
    if not fa3 or "loss_err" not in fa3:
        return
    if ind and "loss_err" in ind:
        fa3["accuracy_ok"] = all(fa3[k] <= 2 * ind[k] + GUARD for k in ("loss_err", "grad_err_worst", "grad_err_all"))
    if ind and "step_ms" in ind and "step_ms" in fa3:
        fa3["speedup_vs_inductor"] = ind["step_ms"] / fa3["step_ms"]
        fa3["vs_inductor_resolved"] = common.versus(*((r["step_ms"], r["step_ms_min"], r["step_ms_max"])
                                                      for r in (fa3, ind)))
    kern = fa3.get("kernels", {})
    if device.type == "cuda":
        # every entry but the reference runs a Triton backward (hopper's is the portable Triton one)
        fa3["triton_backward"] = any(k.startswith("backward:") for k in kern) and \
            not any(k == "backward:reference" for k in kern)


def line(r) -> str:
    tag = f"{r['model']:6s} {r['impl']:5s} {r['mode']:8s}"
    if "error" in r or "skipped" in r:
        return f"{tag} {r.get('error') or r.get('skipped')}"
    return (f"{tag} step {r['step_ms']:9.2f} ms [{r['step_ms_min']:.2f}, {r['step_ms_max']:.2f}] over "
            f"{r['rounds']} rounds  loss {r['loss']:.5g} (err {r['loss_err']:.1e})  grad err worst "
            f"{r['grad_err_worst']:.1e} ({r['grad_err_worst_param']}) all {r['grad_err_all']:.1e}  "
            f"graphs {r.get('graphs', '-')} recompiles {r.get('recompiles', '-')} kernels {r.get('kernels', '-')}")


def markdown(results, head) -> list[str]:
    f = common.fmt
    lines = list(head) + ["", "Errors vs fp32 eager: loss relative, gradients ||g - g_ref|| / ||g_ref|| (worst "
                          "parameter, and all together). accuracy ok: fa3 within 2x Inductor's error + 1e-3. step ms: "
                          "median [min, max] over rounds (every mode compiled first, then timed in an order rotated "
                          "per round); vs inductor: ratio of medians, resolved: \"within noise\" where the two "
                          "[min, max] overlap, else faster / slower.", "",
                          "| model | impl | shape | padding | mode | step ms | vs inductor | resolved | loss err | "
                          "grad err worst | grad err all | graphs (recompiles) | kernels | accuracy ok | "
                          "Triton backward | notes |",
                          "|" + "---|" * 16]
    for r in results:
        kern = common.kernels_cell(r.get("kernels"))
        graphs = f"{r['graphs']} ({r.get('recompiles', '-')})" if "graphs" in r else "-"
        step = "-" if r.get("step_ms") is None else \
            f"{r['step_ms']:.2f} [{r['step_ms_min']:.2f}, {r['step_ms_max']:.2f}]"
        note = r.get("error") or r.get("skipped") or ""
        if r.get("rounds") is not None and r["rounds"] < r["rounds_asked"]:
            note = f"{r['rounds']} of {r['rounds_asked']} rounds (time budget)"
        lines.append(f"| {r['model']} | {r['impl']} | {r.get('shape', '-')} | {r.get('padding', '-')} | {r['mode']} | "
                     f"{step} | {f(r.get('speedup_vs_inductor'), '.2f')} | {r.get('vs_inductor_resolved', '-')} | "
                     f"{f(r.get('loss_err'), '.1e')} | {f(r.get('grad_err_worst'), '.1e')} | "
                     f"{f(r.get('grad_err_all'), '.1e')} | {graphs} | {kern} | {r.get('accuracy_ok', '-')} | "
                     f"{r.get('triton_backward', '-')} | {note} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", "--quick", dest="cpu", action="store_true", help="tiny models, fp32, on CPU")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--impls", default="sdpa")
    ap.add_argument("--modes", default="inductor,fa3")
    ap.add_argument("--seq", type=int, default=None, help="llama sequence length (default 4096)")
    ap.add_argument("--steps", type=int, default=3, help="at least this many timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=5, help="rotated timing rounds per model (default 5)")
    ap.add_argument("--round-ms", type=float, default=None,
                    help="timed steps per mode and round: about this many ms (default 150; --cpu 30)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; later work is skipped")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    device = common.pick_device(args.cpu)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if device.type == "cpu":
        torch.set_num_threads(1)    # Inductor's OpenMP kernels on a shared 2-core host: barriers stall for ms
    args.round_ms = args.round_ms or (30.0 if device.type == "cpu" else 150.0)
    args.modes = args.modes.split(",")
    args.budget_obj = common.Budget(args.budget)
    head = common.header(f"One AdamW training step, {args.rounds} rotated rounds of ~{args.round_ms:.0f} ms "
                         "per mode", device)
    print("\n".join(head), flush=True)
    stem = "train_cpu" if device.type == "cpu" else "train"
    results = []
    # results so far, also mid-case: a stage killed by a timeout keeps what it measured
    args.on_row = lambda rows: common.write_results(args.out, stem, head, results + rows, markdown(results + rows, head))
    for name in args.models.split(","):
        for impl in args.impls.split(","):
            if args.budget_obj.left() <= 0:
                results.append({"model": name, "impl": impl, "mode": "-", "skipped": "time budget"})
                continue
            try:
                results += run_case(name, impl, args.modes, args, device, dtype)
            except Exception as exc:
                traceback.print_exc()
                results.append({"model": name, "impl": impl, "mode": "-", "error": repr(exc)[:300]})
            common.write_results(args.out, stem, head, results, markdown(results, head))
    head = head + [f"elapsed {args.budget_obj.elapsed():.0f} s of a {args.budget:.0f} s budget"]
    lines = markdown(results, head)
    common.write_results(args.out, stem, head, results, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
