"""The measured choice (fa3_inductor/site_choice.py): a static site stays Inductor's when the timings say
Inductor's path is faster, the decision is cached in memory and on disk under a key that follows the site's
shapes, dtypes and gradients, the flag turns it off, and a failed measurement never fails the compile.

The machinery measures CUDA sites only; these tests let it measure CPU sites (MEASURE_DEVICES) and mostly inject
the timer and skip Inductor (COMPILE runs the cut-out graph eagerly), so they test the decisions, not this
machine's speed. One test runs the real thing end to end: Inductor compiles inside the fa3 backend's compile,
forward and backward, on the real timer.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

import fa3_inductor
from fa3_inductor import config, site_choice
from fa3_inductor.backend import decide
from fa3_inductor.site_values import real_tensor, visible_keys


def sdpa_site(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2


def eager_site(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v


def two_sites(q, k, v, q2, k2, v2):
    return eager_site(q, k, v) + eager_site(q2, k2, v2)


def inputs(s=32, dtype=torch.float32, grad=False, mask=True):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, s, 16, generator=g, dtype=torch.float32).to(dtype).requires_grad_(grad)
               for _ in range(3))
    if not mask:
        return q, k, v
    return q, k, v, torch.arange(s)[None, None, None, :] < torch.tensor([s - 3]).view(1, 1, 1, 1)


class FakeTimer:
    def __init__(self, inductor_us, fa3_us):
        self.us = {"inductor": inductor_us, "fa3": fa3_us}
        self.calls = []

    def __call__(self, fn, sync, which):
        fn()        # the compiled site runs (here: the cut-out graph, eagerly)
        sync()
        self.calls.append(which)
        return self.us[which]


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """CPU sites are measured, with a fresh cache and the cut-out graphs run eagerly (no Inductor)."""
    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FA3_MEASURE_SITES", raising=False)
    monkeypatch.setattr(site_choice, "MEASURE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(site_choice, "_MEMORY", {})
    monkeypatch.setattr(site_choice, "COMPILE", lambda gm, args, options: gm)

    def use(inductor_us, fa3_us):
        timer = FakeTimer(inductor_us, fa3_us)
        monkeypatch.setattr(site_choice, "TIMER", timer)
        return timer
    return use


def explain(fn, *args):
    torch._dynamo.reset()
    return fa3_inductor.explain(fn, *args)


def test_kept_for_inductor_when_it_is_faster(measuring):
    timer = measuring(50.0, 100.0)
    report = explain(sdpa_site, *inputs())
    assert report.rewritten == 0 and sorted(timer.calls) == ["fa3", "inductor"]
    reason = report.skipped[0].reason
    assert reason.startswith("kept for Inductor: measured 50 us vs fa3 100 us per call at B=1 H=2 Sq=32 Sk=32 D=16 "
                             "float32, forward (measuring took"), reason
    assert "kept for Inductor" in str(report)


@pytest.mark.parametrize("fa3_us", [50.0, 102.0])     # faster, or slower by less than the margin
def test_rewritten_when_fa3_is_faster_or_within_the_margin(measuring, fa3_us):
    measuring(100.0, fa3_us)
    report = explain(eager_site, *inputs(mask=False))
    assert report.rewritten == 1
    assert report.sites[0].note.startswith(f"measured fa3 {fa3_us:.0f} us vs Inductor 100 us per call at B=1 H=2")


def test_equal_sites_of_a_graph_are_measured_once(measuring):
    timer = measuring(100.0, 50.0)
    report = explain(two_sites, *inputs(mask=False), *inputs(mask=False))
    assert report.rewritten == 2 and len(timer.calls) == 2
    assert "cached (memory)" in report.sites[1].note


def test_cache_memory_disk_and_key(measuring):
    timer = measuring(50.0, 100.0)
    explain(sdpa_site, *inputs())
    assert len(timer.calls) == 2
    again = explain(sdpa_site, *inputs())                    # same process: memory
    assert len(timer.calls) == 2 and "cached (memory)" in again.skipped[0].reason
    site_choice._MEMORY.clear()                                # a new process: disk
    disk = explain(sdpa_site, *inputs())
    assert len(timer.calls) == 2 and "cached (disk)" in disk.skipped[0].reason
    assert len(os.listdir(os.path.join(os.environ["FA3_CACHE_DIR"], "site_choice"))) == 1
    for changed in (inputs(s=48), inputs(dtype=torch.float16), inputs(grad=True)):
        n = len(timer.calls)
        report = explain(sdpa_site, *changed)
        assert len(timer.calls) == n + 2, "a different site signature must be measured"
        assert "measuring took" in report.skipped[0].reason
    assert "fwd+bwd" in report.skipped[0].reason


def test_flag_turns_measuring_off(measuring, monkeypatch):
    timer = measuring(50.0, 100.0)
    monkeypatch.setenv("FA3_MEASURE_SITES", "0")
    assert config.from_env().measure_sites is False
    report = explain(sdpa_site, *inputs())
    assert report.rewritten == 1 and report.sites[0].note == "" and timer.calls == []
    cfg, rest = config.Config().with_options({"measure_sites": False, "max_autotune": True})
    assert cfg.measure_sites is False and rest == {"max_autotune": True}
    with pytest.raises(ValueError, match="measure_sites"):
        config.Config().with_options({"measure_sites": "no"})


def _decide_in_backend(fn, args, dynamic_seq=False, **kw):
    seen = {}

    def backend(gm, example_inputs, **_):
        seen["decided"] = decide(gm, config.from_env(), **kw)
        return gm.forward
    torch._dynamo.reset()
    if dynamic_seq:
        for t in args[:3]:
            torch._dynamo.mark_dynamic(t, 2)
    torch.compile(fn, backend=backend)(*args)
    return seen["decided"]


def test_not_measured_under_cuda_graphs_or_with_dynamic_sizes(measuring):
    timer = measuring(50.0, 100.0)
    specs, skips, notes = _decide_in_backend(sdpa_site, inputs(), cuda_graphs=True)
    assert len(specs) == 1 and not skips and notes == [""]
    specs, skips, notes = _decide_in_backend(eager_site, inputs(mask=False), dynamic_seq=True)
    assert len(specs) == 1 and not skips and notes == [""]
    assert timer.calls == []


def test_failed_measurement_rewrites_and_says_why(measuring, monkeypatch):
    timer = measuring(50.0, 100.0)

    def broken(gm, args, options):
        raise RuntimeError("no kernel for you")
    monkeypatch.setattr(site_choice, "COMPILE", broken)
    report = explain(sdpa_site, *inputs())
    assert report.rewritten == 1 and timer.calls == []
    assert report.sites[0].note == "measured choice failed (RuntimeError: no kernel for you); rewritten without it"
    assert not os.path.exists(os.path.join(os.environ["FA3_CACHE_DIR"], "site_choice")) or \
        not os.listdir(os.path.join(os.environ["FA3_CACHE_DIR"], "site_choice"))   # failures are not kept


def test_inductor_compiles_inside_the_backend_forward_and_backward(monkeypatch, tmp_path, caplog):
    """The real path: Inductor compiles both cut-out graphs from inside the fa3 backend (its own thread; the
    backward compiles lazily while timing) and the real timer runs; the model's own compile is unaffected."""
    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(site_choice, "MEASURE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(site_choice, "_MEMORY", {})
    monkeypatch.setattr(site_choice, "REPEATS", 1)
    monkeypatch.setattr(site_choice, "WARMUP", 1)
    q, k, v, mask = inputs(grad=True)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="fa3_inductor"):
        out = torch.compile(sdpa_site, backend="fa3")(q, k, v, mask)
        out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = sdpa_site(q, k, v, mask)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)
    measured = [r.getMessage() for r in caplog.records if "fa3 measured site" in r.getMessage()]
    assert len(measured) == 1 and "fwd+bwd" in measured[0] and "failed" not in measured[0], measured


def test_site_values_padding_rows_and_layout():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bool, torch.int64, torch.float16):
        ex = torch.empty(6, 1, 3, 40, dtype=dtype, device="meta")
        t = real_tensor(ex, "other", gen, "cpu")
        visible = t if dtype == torch.bool else (t == 1 if dtype == torch.int64 else t > torch.finfo(dtype).min)
        per_row = visible.sum(-1)
        assert t.dtype == dtype and (per_row >= 1).all() and (per_row < 40).all()    # both polarities have keys
        assert per_row[:, 0, 0].tolist() == visible_keys(6, 40)
    ex = torch.empty(2, 5, 4, 8, device="meta", dtype=torch.float16).transpose(1, 2)
    t = real_tensor(ex, "q", gen, "cpu")
    assert t.stride() == ex.stride() and t.dtype == ex.dtype and t.float().std() > 0.5
    ex = torch.empty(2, 1, 1, 9, device="meta").expand(2, 4, 5, 9).requires_grad_(True)
    t = real_tensor(ex, "other", gen, "cpu")
    assert t.stride() == ex.stride() and t.requires_grad
    assert torch.equal(torch.rand(1), before), "the caller's RNG stream moved"
