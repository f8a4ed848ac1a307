"""Cutting a site out of a real model's graph (fa3_inductor/site_subgraph.py) is exact: on the values the model's
graph computes, the cut-out site as written gives bit for bit the value of the site's output node, and the cut-out
rewritten site gives it up to the kernel's rounding. Zoo "tiny" models of the bench (BERT, T5, Whisper, ViT),
eager and sdpa spellings, fp32 on CPU; Dynamo traces each once and nothing is compiled.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx import Interpreter

pytest.importorskip("transformers")

import zoo  # noqa: E402  (tests/models is on sys.path)
from fa3_inductor.patterns.matcher import find_sites  # noqa: E402
from fa3_inductor.site_subgraph import extract, signature  # noqa: E402

CASES = [pytest.param(m, i, id=f"{m}-{i}") for m in ("bert", "t5", "whisper", "vit") for i in ("eager", "sdpa")]


class _Recorder(Interpreter):
    """Runs the graph on real inputs and keeps every node's value."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        self.values[n] = super().run_node(n)
        return self.values[n]


@pytest.mark.parametrize("name,impl", CASES)
def test_cut_out_site_computes_the_sites_value(name, impl):
    model, inputs, n_calls = zoo.build(name, impl)
    graphs = []

    def capture(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(**inputs)
    seen, signatures = 0, set()
    for gm, args in graphs:
        rec = _Recorder(gm)
        with torch.no_grad():
            rec.run(*args)
        specs, _ = find_sites(gm)
        for spec in specs:
            sub = extract(gm, spec, "auto")
            assert set(sub.roles) >= {"q", "k", "v"}
            assert all(n not in spec.nodes for n in sub.sources), "a node of the site became an input"
            vals = [rec.values[n] for n in sub.sources]
            want = rec.values[sub.returns]
            with torch.no_grad():
                got = sub.original(*vals)[0]
                fa3 = sub.rewritten(*vals)[0]
            assert torch.equal(got, want), spec.site
            assert fa3.shape == want.shape and (fa3 - want).abs().max().item() <= 1e-5 * want.abs().max().item()
            assert "fa3.attention" in sub.rewritten.code and "fa3.attention" not in sub.original.code
            signatures.add(signature(sub))
            seen += 1
    assert seen == n_calls
    # the layers of one model are the same site: canonical names make their signatures equal
    assert len(signatures) < seen
