"""The measured site choice (fa3_inductor/site_choice.py) on a CUDA GPU, real timer and real Inductor: a BERT-sized
padded SDPA site (16x512, 12 heads x 64, bf16; above min_flops) is measured at compile time, forward and
forward+backward, without failing; the compiled graph runs what was decided (the fa3 op ran iff the site was
rewritten) and computes eager's answer; the decision comes from memory, then from disk, without measuring again.
Skipped without CUDA.

    pytest -q tests/gpu/test_site_choice_gpu.py
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from fa3_inductor import dispatch, site_choice

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def bert_site(q, k, v, keep):
    mask = keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def _inputs(grad):
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(16, 512, 12, 64, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               .detach().requires_grad_(grad) for _ in range(3))
    keep = torch.arange(512, device="cuda")[None, :] < torch.randint(256, 513, (16, 1), device="cuda", generator=g)
    return q, k, v, keep


def _forwards() -> int:
    return sum(n for (which, _), n in dispatch.STATS.items() if which == "forward")


def _compile_and_run(args, caplog, grad):
    torch._dynamo.reset()
    before = _forwards()
    with caplog.at_level(logging.INFO, logger="fa3_inductor"):
        caplog.clear()
        out = torch.compile(bert_site, backend="fa3")(*args)
        if grad:
            out.float().sum().backward()
    ran = _forwards() - before
    lines = [r.getMessage() for r in caplog.records]
    decided = [ln for ln in lines if ln.startswith("fa3 rewritten") or ln.startswith("fa3 skipped")]
    return out, ran, [ln for ln in lines if ln.startswith("fa3 measured site")], decided


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "fwd+bwd"])
def test_measured_choice_on_the_gpu(grad, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FA3_MEASURE_SITES", raising=False)
    monkeypatch.setattr(site_choice, "_MEMORY", {})
    args = _inputs(grad)
    out, ran, measured, decided = _compile_and_run(args, caplog, grad)
    assert len(measured) == 1 and "failed" not in measured[0], measured
    assert ("fwd+bwd" if grad else "forward") in measured[0] and "measuring took" in measured[0]
    kept = decided[0].startswith("fa3 skipped: kept for Inductor")
    assert len(decided) == 1 and (kept or decided[0].startswith("fa3 rewritten")), decided
    assert (ran == 0) == kept, (ran, decided)
    with torch.no_grad():
        ref = bert_site(*(t.float() if t.is_floating_point() else t for t in args))
    assert (out.float() - ref).abs().max().item() < 2e-2
    for where in ("memory", "disk"):
        if where == "disk":
            site_choice._MEMORY.clear()
        _, ran2, measured2, decided2 = _compile_and_run(_inputs(grad), caplog, grad)
        assert measured2 == [] and f"cached ({where})" in decided2[0], decided2
        assert (ran2 == 0) == kept
