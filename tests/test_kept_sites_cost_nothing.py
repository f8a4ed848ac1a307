"""A graph whose attention sites the fa3 backend keeps for Inductor compiles to Inductor's own code and costs no
extra host work per call (issue 6: generate()'s StaticCache decode read slower under backend="fa3" although the
measured choice had kept every decode site).

A tiny Llama's generate() with a StaticCache, its forward compiled by Inductor and by the fa3 backend whose
measured site choice (site_choice.py, made to measure CPU sites, Inductor compiling the cut-out sites for real
on its thread; the timer says Inductor is faster) keeps every site: each graph's Inductor output code must be
byte-identical (but for its AOT id) and a decode call must make the same number of Python calls.
"""

from __future__ import annotations

import cProfile
import logging
import pstats

import pytest
import torch

pytest.importorskip("transformers")

from fa3_inductor import site_choice  # noqa: E402

from helpers import import_bench  # noqa: E402

common = import_bench("common")
from test_generation import tiny_llama  # noqa: E402

NEW = 3


class Run:
    """One backend: generate() through a forward compiled with it; the output code of every graph it compiled
    ({"prefill" | "decode": hash}) and the Python calls of its decode calls."""

    def __init__(self, model, backend):
        self.model, self.code, self.profile, self.decode_calls = model, {}, None, 0
        self.cache = common.static_cache(model, 1, 16, torch.device("cpu"))
        # a code object of its own: the other run's frame state (automatic dynamic shapes) does not reach it
        self.compiled = torch.compile(common.own_code(model.forward, str(backend)), backend=self.recording(backend))

    def recording(self, backend):
        def compile_graph(gm, example_inputs):
            ids = [n for n in gm.graph.nodes if n.op == "placeholder" and "input_ids" in n.name]
            kind = "decode" if ids[0].meta["example_value"].shape[-1] == 1 else "prefill"
            with common.inductor_output_code() as sources:
                compiled = backend(gm, example_inputs)
            for src in sources:
                self.code[kind] = common.code_hash(src)
            return compiled
        return compile_graph

    def forward(self, *args, **kwargs):
        if self.profile is None or kwargs["input_ids"].shape[-1] != 1:
            return self.compiled(*args, **kwargs)
        self.decode_calls += 1
        self.profile.enable()
        try:
            return self.compiled(*args, **kwargs)
        finally:
            self.profile.disable()

    def generate(self, ids):
        self.cache.reset()
        eager, self.model.forward = self.model.forward, self.forward
        try:
            with torch.no_grad():
                return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                           min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                           past_key_values=self.cache, disable_compile=True)
        finally:
            self.model.forward = eager

    def python_calls_per_decode_call(self, ids) -> float:
        self.profile = cProfile.Profile()
        self.generate(ids)
        calls = sum(v[1] for v in pstats.Stats(self.profile).stats.values())
        self.profile = None
        return calls / self.decode_calls


def test_kept_sites_compile_to_inductors_code_with_no_extra_host_work(monkeypatch, tmp_path, caplog):
    from fa3_inductor.backend import fa3_backend
    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FA3_MEASURE_SITES", raising=False)
    monkeypatch.delenv("FA3_DISABLE", raising=False)
    monkeypatch.setattr(site_choice, "MEASURE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(site_choice, "_MEMORY", {})
    timed = []

    def inductor_faster(fn, sync, which):
        fn()
        timed.append(which)
        return 10.0 if which == "inductor" else 20.0
    monkeypatch.setattr(site_choice, "TIMER", inductor_faster)

    model = tiny_llama("sdpa")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, backend in (("inductor", torch._TorchCompileInductorWrapper(None, None, None)),
                          ("fa3", fa3_backend)):
        torch._dynamo.reset()
        run = runs[name] = Run(model, backend)
        with caplog.at_level(logging.INFO, logger="fa3_inductor"):
            tokens = run.generate(ids)
            run.generate(ids)
        run.tokens, run.calls = tokens, run.python_calls_per_decode_call(ids)
    sites = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("fa3 rewritten", "fa3 skipped"))]
    # the measured choice ran (both cut-out graphs compiled and timed) and kept the prefill and the decode site
    assert len(sites) == 2 and all("kept for Inductor: measured 10 us vs fa3 20 us" in s for s in sites), sites
    assert sorted(timed) == ["fa3", "fa3", "inductor", "inductor"]
    assert set(runs["inductor"].code) == {"prefill", "decode"}
    assert runs["fa3"].code == runs["inductor"].code
    assert runs["fa3"].calls == runs["inductor"].calls
    assert torch.equal(runs["fa3"].tokens, runs["inductor"].tokens)
