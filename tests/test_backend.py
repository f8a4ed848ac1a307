"""The fa3 backend through Inductor: entry point, options and env flags, dynamic shapes, explain, bad input."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import fa3_inductor
from fa3_inductor import ScoreProgram
from fa3_inductor.config import Config, from_env


def llama_eager_attention(q, k, v, mask):
    """HF Llama's eager form: matmul·scaling + mask, softmax(dtype=float32).to(dtype), matmul."""
    s = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5) + mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    p = F.dropout(p, p=0.0, training=False)
    return torch.matmul(p, v).transpose(1, 2).contiguous()


def _inputs(b=2, h=4, s=9, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.full((s, s), torch.finfo(dtype).min).triu(1).expand(b, 1, s, s).contiguous()
    return q, k, v, mask


def test_entry_point_backend_through_inductor():
    torch._dynamo.reset()
    args = _inputs()
    out = torch.compile(llama_eager_attention, backend="fa3")(*args)
    torch.testing.assert_close(out, llama_eager_attention(*args), atol=2e-5, rtol=1e-4)


def test_training_gradients_through_inductor():
    torch._dynamo.reset()
    q, k, v, mask = _inputs()
    bias = torch.randn(1, 4, 9, 9, requires_grad=True)

    def f(q, k, v, bias):
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, -1) @ v

    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [bias]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = torch.compile(f, backend="fa3")(*leaves)
    ref = f(*ref_leaves)
    seed = torch.randn_like(ref)
    (out * seed).sum().backward()
    (ref * seed).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-4)


def test_dynamic_sequence_length_does_not_recompile():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("fa3")
    fn = torch.compile(llama_eager_attention, backend=counter, dynamic=True)
    for s in (7, 12, 33):
        args = _inputs(s=s, seed=s)
        torch.testing.assert_close(fn(*args), llama_eager_attention(*args), atol=2e-5, rtol=1e-4)
    assert counter.frame_count == 1


def test_explain_reports_sites_and_skips(caplog):
    q, k, v, mask = _inputs()

    def two_sites(q, k, v, mask):
        a = llama_eager_attention(q, k, v, mask)
        w = (q @ k.transpose(-1, -2)).softmax(-1)        # weights also returned: must be skipped
        return a, w @ v, w

    with caplog.at_level(logging.INFO, logger="fa3_inductor"):
        report = fa3_inductor.explain(two_sites, q, k, v, mask)
    assert report.rewritten == 1
    assert len(report.skipped) == 1 and "also used outside attention" in report.skipped[0].reason
    text = str(report)
    assert "rewritten" in text and "skipped" in text and "F.softmax(dtype=float32)" in text
    assert any("fa3 rewritten" in r.message for r in caplog.records)


def test_disable_flag_and_options(monkeypatch):
    monkeypatch.setenv("FA3_DISABLE", "1")
    assert fa3_inductor.explain(llama_eager_attention, *_inputs()).rewritten == 0
    monkeypatch.delenv("FA3_DISABLE")
    cfg, rest = from_env().with_options({"kernel": "reference", "max_autotune": False})
    assert cfg.kernel == "reference" and rest == {"max_autotune": False}
    with pytest.raises(ValueError, match="kernel"):
        Config(kernel="cuda-magic").validate()
    monkeypatch.setenv("FA3_DISABLE", "maybe")
    with pytest.raises(ValueError, match="FA3_DISABLE"):
        from_env()
    monkeypatch.delenv("FA3_DISABLE")
    torch._dynamo.reset()
    args = _inputs()
    out = torch.compile(llama_eager_attention, backend="fa3", options={"kernel": "reference"})(*args)
    torch.testing.assert_close(out, llama_eager_attention(*args), atol=2e-5, rtol=1e-4)


def test_fully_masked_rows_follow_eager():
    """-inf everywhere in a row: eager softmax gives NaN, SDPA gives 0; finfo.min rows give the mean of v."""
    q, k, v, _ = _inputs(s=6)
    allowed = torch.ones(6, 6, dtype=torch.bool)
    allowed[2] = False

    def eager_inf(q, k, v, m):
        return torch.where(m, q @ k.transpose(-1, -2), float("-inf")).softmax(-1) @ v

    def eager_min(q, k, v, m):
        return (q @ k.transpose(-1, -2)).masked_fill(~m, torch.finfo(q.dtype).min).softmax(-1) @ v

    def sdpa(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    for fn in (eager_inf, eager_min, sdpa):
        torch._dynamo.reset()
        out = torch.compile(fn, backend="fa3_eager")(q, k, v, allowed)
        ref = fn(q, k, v, allowed)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4, equal_nan=True)
        assert fa3_inductor.explain(fn, q, k, v, allowed).rewritten == 1


def test_public_op_rejects_bad_arguments():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="4-D"):
        fa3_inductor.attention(q[0], k, v)
    with pytest.raises(ValueError, match="dtypes differ"):
        fa3_inductor.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="multiple"):
        fa3_inductor.attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="does not broadcast"):
        fa3_inductor.attention(q, k, v, [torch.zeros(2, 4, 5, 9)], ScoreProgram(("add", ("score",), ("operand", 0)), 1))
    with pytest.raises(ValueError, match="operands"):
        fa3_inductor.attention(q, k, v, [], ScoreProgram(("add", ("score",), ("operand", 0)), 1))
    with pytest.raises(ValueError, match="kernel"):
        fa3_inductor.attention(q, k, v, kernel="fastest")
    with pytest.raises(ValueError, match="unknown expression op"):
        ScoreProgram(("softmax", ("score",)))
    with pytest.raises(ValueError):
        ScoreProgram(causal="diagonal")
    with pytest.raises(TypeError):
        fa3_inductor.explain(42)


def test_program_roundtrip_and_scale_folding():
    p = ScoreProgram(("where", ("operand", 0), ("mul", ("score",), ("const", 0.125)), ("const", -math.inf)), 1,
                     causal="bottom_right", window=4, empty_row="zero")
    assert ScoreProgram.loads(p.dumps()) == p
    assert ScoreProgram(("div", ("score",), ("const", 8.0))).scale_only() == 0.125
    assert p.scale_only() is None
