"""The measured choice: at compile time, time a static CUDA site both ways and keep it for Inductor when
Inductor's own path for it is faster.

Why measure: a site's cost in a model is not its kernel's GPU time. At BERT's 16x512 the fa3 kernel and cuDNN
take the same 85 us, but the op's call costs several hundred us of host time against ~60 us for SDPA, and the
model is host-bound under Inductor; Inductor also rewrites eager attention to SDPA itself (fuse_attention),
while for ViT its path is 3.5x slower than eager SDPA. No static size rule gets all of these right.

How: the site is cut out of its graph (site_subgraph.py) as the model wrote it and as rewritten to the fa3 op;
both are compiled by Inductor (with the caller's Inductor options) and run on fresh real tensors laid out like
Dynamo's example values (site_values.py); each is timed host-inclusive: the wall clock of N back-to-back calls
after warm-up, synchronised at the end, median of a few repeats, so a host-bound op pays its host cost (forward +
backward when an input requires grad). The site stays Inductor's when that is faster by more than MARGIN.

Where: only sites on a device in MEASURE_DEVICES ("cuda"; tests add "cpu") with static sizes, and not under
CUDA graphs (mode="reduce-overhead"), where host cost vanishes and the GPU times are equal or better for fa3.
min_flops (site_size.py) stays the cheap pre-filter before this: below it the kernel is a few us against the
op's ~100 us of host time, so measuring would pay two compiles to learn the foregone answer.

Decisions are cached in memory and under FA3_CACHE_DIR/site_choice/, keyed by the device name, the torch /
triton / codegen versions, the Inductor options and both cut-out graphs with their inputs' layouts (which
carries the spec, shapes, strides, dtypes and whether gradients are needed), so equal sites of one graph are
measured once and a second process compiles without measuring. A measurement that fails (compile error, OOM)
never fails the compile: the site is rewritten as without measuring, and the note says why.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time

import torch

from .patterns.spec import AttentionSpec
from .site_subgraph import extract, signature
from .site_values import real_inputs

log = logging.getLogger("fa3_inductor")

MARGIN = 0.03                   # Inductor must be this much faster (relative) for the site to stay Inductor's
MEASURE_DEVICES = ("cuda",)     # tests add "cpu"
WARMUP, REPEATS, TARGET_S = 3, 5, 0.02      # per repeat: enough back-to-back calls to fill ~TARGET_S

_MEMORY: dict = {}
# per process: sites measured now / taken from the cache / whose measurement failed, and the seconds spent measuring
STATS: collections.Counter = collections.Counter()


@dataclasses.dataclass
class Measured:
    inductor_us: float | None = None
    fa3_us: float | None = None
    cost_s: float = 0.0             # wall time this measurement took (compiles + timing) when it was made
    grad: bool = False
    error: str = ""
    cached: str = ""                # "" (measured now), "memory" or "disk"

    @property
    def keep_inductor(self) -> bool:
        return not self.error and self.inductor_us * (1 + MARGIN) < self.fa3_us

    def describe(self, spec: AttentionSpec, dtype) -> str:
        where = f"at {spec.shape} {str(dtype).replace('torch.', '')}, {'fwd+bwd' if self.grad else 'forward'}"
        took = f"cached ({self.cached})" if self.cached else f"measuring took {self.cost_s:.1f} s"
        if self.error:
            return f"measured choice failed ({self.error}); rewritten without it"
        if self.keep_inductor:
            return (f"kept for Inductor: measured {self.inductor_us:.0f} us vs fa3 {self.fa3_us:.0f} us per call "
                    f"{where} ({took}; options={{'measure_sites': False}} rewrites it)")
        return f"measured fa3 {self.fa3_us:.0f} us vs Inductor {self.inductor_us:.0f} us per call {where} ({took})"


def host_inclusive_us(fn, sync) -> float:
    """Median over REPEATS of the wall time per call of N back-to-back calls, synchronised at the end."""
    for _ in range(WARMUP):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    n = max(3, min(200, int(TARGET_S / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(REPEATS):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times) * 1e6


def _timer(fn, sync, which: str) -> float:
    return host_inclusive_us(fn, sync)


TIMER = _timer                  # TIMER(fn, sync, "inductor" | "fa3") -> us per call; tests inject their own


def _compile(gm, args, inductor_options: dict):
    """Inductor on a standalone graph. Runs on the measuring thread (_isolated), so Dynamo's tracing context,
    fake mode and compile metrics of the graph being compiled do not reach it."""
    from torch._inductor.compile_fx import compile_fx
    for node in gm.graph.nodes:
        for key in ("example_value", "val", "tensor_meta"):
            node.meta.pop(key, None)
    return compile_fx(gm, list(args), config_patches=dict(inductor_options) or None)


COMPILE = _compile              # COMPILE(gm, args, inductor_options) -> callable; tests may skip Inductor


def _isolated(fn):
    """fn() on a fresh thread: the backend runs inside Dynamo's compile, whose tracing context (fake mode, shape
    environment), dispatch modes, frame hook, grad mode and compile-metrics context are all thread-local; a nested
    Inductor compile on this thread would mix with them (its lazily compiled backward fails on the metrics).
    Dynamo's compile lock, held here, is handed over for the duration (Inductor's backward compile takes it)."""
    import threading
    from torch._dynamo.convert_frame import compile_lock
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:       # noqa: BLE001  (re-raised on the caller's thread)
            box["error"] = exc
    held = None
    if compile_lock._is_owned():
        held = compile_lock._release_save()     # the whole recursion count, as threading.Condition does
    try:
        worker = threading.Thread(target=target, name="fa3-site-choice")
        worker.start()
        worker.join()
    finally:
        if held is not None:
            compile_lock._acquire_restore(held)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _runner(compiled, args, grad: bool):
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        out = compiled(*args)[0]
        if grad:
            torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)   # (the op may skip one)
    return run


def _machine(device: torch.device) -> str:
    import triton
    from .kernels.codegen import CODEGEN_VERSION
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|torch {torch.__version__}|triton {triton.__version__}|codegen {CODEGEN_VERSION}"


def _disk_path(key: str) -> str:
    from .kernels.codegen import cache_dir
    path = os.path.join(os.path.dirname(cache_dir()), "site_choice")
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, key + ".json")


def _load(key: str) -> Measured | None:
    if key in _MEMORY:
        return dataclasses.replace(_MEMORY[key], cached="memory")
    try:
        with open(_disk_path(key)) as f:
            m = Measured(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    _MEMORY[key] = m
    return dataclasses.replace(m, cached="disk")


def _store(key: str, m: Measured) -> None:
    _MEMORY[key] = m
    if m.error:
        return      # a failure may be transient (OOM): remembered for this process only
    try:
        tmp = _disk_path(key) + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(m), f)
        os.replace(tmp, _disk_path(key))
    except OSError as exc:
        log.info("fa3: site choice not cached on disk: %s", exc)


def _measure(sub, device: torch.device, inductor_options: dict) -> Measured:
    from . import dispatch
    from torch._dynamo.utils import counters
    grad = any(isinstance(e, torch.Tensor) and e.requires_grad for e in sub.inputs)
    stats, saved = collections.Counter(dispatch.STATS), {k: collections.Counter(v) for k, v in counters.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()

    def run():
        args = real_inputs(sub.inputs, sub.roles, device=device)
        # the current CUDA device is per thread: this one starts on cuda:0
        with torch.enable_grad() if grad else torch.no_grad(), \
                torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            times = {}
            for name, gm in (("inductor", sub.original), ("fa3", sub.rewritten)):
                times[name] = TIMER(_runner(COMPILE(gm, args, inductor_options), args, grad), sync, name)
        return Measured(times["inductor"], times["fa3"], time.perf_counter() - t0, grad)
    try:
        return _isolated(run)
    finally:
        dispatch.STATS.clear()
        dispatch.STATS.update(stats)    # the measuring calls are not the model's
        counters.clear()
        counters.update(saved)


def static_device(spec: AttentionSpec):
    """The site's device when every size of the op's inputs is static, else None."""
    from .rewrite import example_inputs
    vals = example_inputs(spec)
    if vals is None:
        return None, None
    q, k, v, operands = vals
    if not all(type(s) is int for t in (q, k, v, *operands) for s in t.shape):
        return None, None
    return q.device, q.dtype


def choose(gm, spec: AttentionSpec, kernel: str, fp8: str, cuda_graphs: bool, enabled: bool,
           inductor_options: dict | None = None) -> tuple[str | None, str]:
    """(reason to keep the site for Inductor or None, note for the report) for one site of gm."""
    if not enabled or cuda_graphs:
        return None, ""
    device, dtype = static_device(spec)
    if device is None or device.type not in MEASURE_DEVICES:
        return None, ""
    options = dict(inductor_options or {})
    try:
        sub = extract(gm, spec, kernel, fp8)
        key = hashlib.sha256("\n".join([_machine(device), repr(sorted(options.items())), signature(sub)])
                             .encode()).hexdigest()[:32]
    except Exception as exc:       # noqa: BLE001  (never fail the compile over a measurement)
        m = Measured(error=f"{type(exc).__name__}: {exc}")
    else:
        m = _load(key)
        if m is None:
            t0 = time.perf_counter()
            try:
                m = _measure(sub, device, options)
            except Exception as exc:       # noqa: BLE001
                m = Measured(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             cost_s=time.perf_counter() - t0)
            _store(key, m)
            STATS["seconds"] += m.cost_s
            log.info("fa3 measured site [%s] %s", spec.site, m.describe(spec, dtype))
    STATS["failed" if m.error else ("cached" if m.cached else "measured")] += 1
    text = m.describe(spec, dtype)
    return (text, "") if m.keep_inductor else (None, text)
