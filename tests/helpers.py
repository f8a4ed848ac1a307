"""Shared test machinery: compile through the fa3 rewrite and compare with eager under the accuracy rule."""

from __future__ import annotations

import torch

from fa3_inductor import config as fa3_config
from fa3_inductor.backend import rewrite_graph


class CountingBackend:
    """The fa3 rewrite followed by eager execution of the graph, recording every report (no Inductor)."""

    def __init__(self):
        self.reports = []

    def __call__(self, gm, example_inputs, **_):
        self.reports.append(rewrite_graph(gm, fa3_config.from_env()))
        return gm.forward

    @property
    def rewritten(self):
        return sum(r.rewritten for r in self.reports)

    @property
    def skipped(self):
        return [s for r in self.reports for s in r.skipped]


def compile_counting(fn):
    torch._dynamo.reset()
    backend = CountingBackend()
    return torch.compile(fn, backend=backend, fullgraph=False), backend


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)] if isinstance(out, (tuple, list)) else []


def assert_close_by_rule(ours, eager, ref64, what="", scale=0.0):
    """FlashAttention's rule: |ours - ref| <= 2·|eager - ref| + guard (per tensor, max-abs), NaNs where eager has them.

    The absolute guard is the dtype's epsilon-level constant times the magnitude of the values involved: the
    tensor's own, or `scale` when larger. A gradient that is exactly 0 in eager and in fp64 (softmax over a
    single key: dS = P·(dP − rowsum(dO·O)) cancels exactly) is computed by us from dP terms as large as the
    other gradients, and its fp32 rounding is relative to those: callers pass the largest |gradient| of the
    same backward as `scale`."""
    for a, e, r in zip(flat(ours), flat(eager), flat(ref64)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
        nan = torch.isnan(e)
        assert torch.equal(torch.isnan(a), nan), f"{what}: NaN pattern differs from eager"
        dtype = e.dtype
        a, e, r = a[~nan].double(), e[~nan].double(), r[~nan].double()
        if a.numel() == 0:
            continue
        guard = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype] \
            * max(1.0, r.abs().max().item(), scale)
        ours_err = (a - r).abs().max().item()
        eager_err = (e - r).abs().max().item()
        assert ours_err <= 2 * eager_err + guard, f"{what}: error {ours_err:.3g} > 2×eager {eager_err:.3g} + {guard:.3g}"


def import_bench(*names: str):
    """bench/ modules by name (bench/common.py and the scripts), with bench/ on sys.path only while they import:
    its accuracy.py must not shadow tests/gpu/accuracy.py. What the modules put on sys.path themselves (common:
    tests/models, for the zoo) stays, as it does when a script runs, so a later import of them works in any
    test order."""
    import importlib
    import os
    import sys
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    sys.path.insert(0, bench)
    try:
        mods = [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(bench)
    return mods[0] if len(mods) == 1 else mods
