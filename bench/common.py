"""Shared pieces of the model benchmarks (bench/models.py, generate.py, train.py): device and header, timing (also
in rotated rounds), the time budget, compile counting, fa3 site and dispatch logs, result files.

Scripts import it as `common` (bench/ is put on sys.path by each script); fa3_inductor must be the installed
package (the source tree maps kernels/ and patterns/ into it), so run them from outside the tree's root.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "models"))   # zoo.py: the HF model zoo shared with the tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def git_commit() -> str:
    if os.environ.get("FA3_COMMIT"):      # the device gets the tree without .git: the caller names the commit
        return os.environ["FA3_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def pick_device(cpu: bool) -> torch.device:
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def header(title: str, device: torch.device) -> list[str]:
    import transformers
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return [f"# {title}, {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
            f"transformers {transformers.__version__}; commit {git_commit()}"]


class Budget:
    """Wall-clock budget of a script: work that would start after it is skipped and marked as such."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.time()

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)

    def elapsed(self) -> float:
        return time.time() - self.start


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, target_ms: float = 400.0, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median wall time of fn() in ms (CUDA events on a GPU); the caller has warmed fn up (compiled it)."""
    def once():
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    first = once()
    reps = max(min_reps, min(max_reps, int(target_ms / max(first, 1e-3))))
    return statistics.median([once() for _ in range(reps)])


def cold_copies(nbytes: int, device, at_least: int = 2, cap: int = 16) -> int:
    """How many copies of a call's inputs (nbytes each) to cycle through so that none is still in L2 when its
    turn comes back: together at least 4x the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) if device.type == "cuda" \
        else 0
    return max(at_least, min(cap, -(-4 * l2 // max(1, nbytes))))


def graph_ms(fns, device, rep_ms: float = 30.0, replays: int = 10) -> float:
    """Median ms per call of fns called round-robin inside one CUDA graph: GPU time alone (no host launch cost, as
    under mode="reduce-overhead"), each fn reading its own copy of the inputs (cold_copies) so that L2 holds
    none of them. Each fn must have been called (compiled, tuned) before."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for f in fns:
            f()
        end.record()
        end.synchronize()
        n = max(len(fns), int(rep_ms / max(start.elapsed_time(end) / len(fns), 1e-4)))
        n = -(-n // len(fns)) * len(fns)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(n):
                fns[i % len(fns)]()
        graph.replay()      # first replay uploads the graph
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n)
    torch.cuda.current_stream(device).wait_stream(stream)
    del graph
    return statistics.median(times)


@contextlib.contextmanager
def inductor_output_code():
    """Yields a list that, when the block exits, holds the source of every Inductor output-code module (one with
    a `call` wrapper) loaded while the block ran, in load order."""
    from torch._inductor.codecache import PyCodeCache
    orig, paths, sources = PyCodeCache.load_by_key_path.__func__, [], []

    def load(cls, key, path, *args, **kwargs):
        paths.append(path)
        return orig(cls, key, path, *args, **kwargs)
    PyCodeCache.load_by_key_path = classmethod(load)
    try:
        yield sources
    finally:
        PyCodeCache.load_by_key_path = classmethod(orig)
        for path in paths:
            with open(path) as f:
                src = f.read()
            if "def call(" in src:
                sources.append(src)


def code_hash(src: str) -> str:
    """sha256 of an output-code module without its AOT ID lines (which differ between equal graphs)."""
    return hashlib.sha256("\n".join(ln for ln in src.splitlines() if "AOT ID" not in ln).encode()).hexdigest()


def own_code(fn, tag: str):
    """A function calling fn whose code object is new: torch.compile of it keeps its own Dynamo cache entries, so
    variants compiled side by side in one process never evaluate each other's guards."""
    ns = {"_fn": fn}
    exec(compile("def forward(*args, **kwargs):\n    return _fn(*args, **kwargs)\n", f"<bench {tag}>", "exec"), ns)
    return ns["forward"]


def rotated_rounds(variants: list, rounds: int, time_round, budget: "Budget | None" = None) -> int:
    """Calls time_round(v) for every variant once per round, round r starting at variant r (mod len): the host
    drifts within a process (bench/decode_host.py: one compiled graph 3.46 then 4.36 ms), so timing one variant
    after another biases the comparison, while rotated rounds spread the drift over all of them. Rounds after the
    first are skipped once the budget is spent; returns the rounds run."""
    for r in range(rounds):
        if r and budget is not None and budget.left() <= 0:
            return r
        k = r % max(1, len(variants))
        for v in variants[k:] + variants[:k]:
            time_round(v)
    return rounds


def spread(values: list[float]) -> dict:
    """Median, min and max of per-round times: the median is the estimate, [min, max] its noise."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def versus(ms: tuple, base_ms: tuple) -> str:
    """Whether a (median, min, max) time is resolved against a baseline's: "within noise" where the two [min, max]
    ranges over rounds overlap, else "faster" / "slower"."""
    if ms[2] < base_ms[1]:
        return "faster"
    if ms[1] > base_ms[2]:
        return "slower"
    return "within noise"


def reset_dynamo() -> None:
    """Fresh Dynamo caches: every benchmark compiles its own frames (and never hits the cache size limit)."""
    torch._dynamo.reset()


class CountingBackend:
    """A torch.compile backend ("inductor" or a registered name such as "fa3") that counts the frames it
    compiles; torch.compile's mode / options reach the wrapped backend as they would by name."""

    def __init__(self, name: str):
        self.name = name
        self.frame_count = 0

    def __call__(self, gm, example_inputs, mode=None, options=None):
        self.frame_count += 1
        if self.name == "inductor":
            return torch._TorchCompileInductorWrapper(mode, options, None)(gm, example_inputs)
        backend = torch._dynamo.lookup_backend(self.name)
        kw = {k: v for k, v in (("mode", mode), ("options", options)) if v is not None}
        return backend(gm, example_inputs, **kw)


def counting_backend(backend: str) -> CountingBackend:
    return CountingBackend(backend)


class SiteLog(logging.Handler):
    """Collects the fa3 backend's per-site decisions ("fa3 rewritten ..." / "fa3 skipped: ...")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("fa3 rewritten") or msg.startswith("fa3 skipped"):
            self.lines.append(msg)

    @property
    def rewritten(self) -> int:
        return sum(ln.startswith("fa3 rewritten") for ln in self.lines)

    @property
    def skipped(self) -> list[str]:
        return [ln for ln in self.lines if ln.startswith("fa3 skipped")]

    def __enter__(self):
        log = logging.getLogger("fa3_inductor")
        self._old = log.level
        log.setLevel(logging.INFO)
        log.addHandler(self)
        return self

    def __exit__(self, *exc):
        log = logging.getLogger("fa3_inductor")
        log.removeHandler(self)
        log.setLevel(self._old)


def dispatch_delta(before: dict) -> dict:
    """Kernel choices since `before` (a copy of fa3_inductor.dispatch.STATS): {"forward:triton": calls, ...}."""
    from fa3_inductor import dispatch
    return {f"{p}:{k}": n - before.get((p, k), 0) for (p, k), n in dispatch.STATS.items()
            if n - before.get((p, k), 0) > 0}


class DispatchCount:
    """Kernel choices (fa3_inductor.dispatch.STATS deltas) summed over the blocks run under counting(): one
    variant's calls, when variants run interleaved."""

    def __init__(self):
        self.counts: dict = {}

    @contextlib.contextmanager
    def counting(self):
        before = dispatch_snapshot()
        try:
            yield
        finally:
            for k, n in dispatch_delta(before).items():
                self.counts[k] = self.counts.get(k, 0) + n


def dispatch_snapshot() -> dict:
    from fa3_inductor import dispatch
    return dict(dispatch.STATS)


def write_results(out_dir: str, stem: str, header_lines: list[str], results: list, md_lines: list[str],
                  extra: dict | None = None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump({"header": header_lines, "results": results, **(extra or {})}, fh, indent=1, default=str)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write("\n".join(md_lines) + "\n")


def static_cache(model, batch: int, max_len: int, device):
    """An initialised transformers StaticCache for `model` (its key/value tensors allocated up front, so the
    compiled decode graph sees fixed addresses and shapes)."""
    from transformers import StaticCache
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    cache.early_initialization(batch, cfg.num_key_value_heads,
                               getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                               model.dtype, device)
    return cache


def fmt(x, spec=".3g", none="-") -> str:
    return none if x is None else format(x, spec)


def kernels_cell(counts: dict | None) -> str:
    """A DispatchCount's counts as a table cell: "forward:hopper×80, backward:hopper×4" ("-" where none ran)."""
    return ", ".join(f"{k}×{v}" for k, v in (counts or {}).items()) or "-"


def free(device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def python_calls(fn) -> tuple[int, int]:
    """(Python function calls of one fn(), those of them in fa3_inductor), counted by cProfile."""
    import cProfile
    import pstats

    import fa3_inductor
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    stats = pstats.Stats(pr).stats
    roots = tuple(os.path.dirname(m.__file__) for m in (fa3_inductor, fa3_inductor.kernels))
    return sum(v[1] for v in stats.values()), sum(v[1] for k, v in stats.items() if k[0].startswith(roots))
