"""FP8 attention on CPU, without the Triton interpreter: the rotation and quantization math (through the
PyTorch emulation that the Triton kernels are tested to reproduce bit for bit in test_fp8_kernels.py),
the flags' way from env / options into the op, and the fallback to 16-bit with its reason."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import fa3_inductor
from fa3_inductor import dispatch
from fa3_inductor.backend import rewrite_graph
from fa3_inductor.config import Config, from_env
from fa3_inductor.kernels import fp8_reference as fr
from fa3_inductor.kernels.fp8_recipe import Fp8Recipe, hadamard_dim, hadamard_matrix, rotation_matrix, signs

FP8_MAX = 448.0


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- rotation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [16, 64, 128, 256, 80])
def test_rotation_is_orthogonal_and_seeded(d):
    r = rotation_matrix(7, d)
    n = hadamard_dim(d)
    assert r.shape == (n, n)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(rotation_matrix(7, d), r)
    assert not torch.equal(rotation_matrix(8, d), r)
    s = signs(7, n)
    assert set(s.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_fwht_matches_explicit_matrix(d):
    x = _rand(5, d, seed=d, dtype=torch.float64)
    h = hadamard_matrix(d)
    assert torch.equal(h, h.T) and torch.equal(h @ h, d * torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(fr.fwht(x), x @ h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", [64, 128, 96])
def test_rotation_keeps_qk_products(d):
    """(Q M)(K M)ᵀ = Q Kᵀ for the kernels' fp32 rotation (padding a head dim that is not a power of two)."""
    q, k = _rand(1, 2, 9, d, seed=1), _rand(1, 2, 11, d, seed=2)
    qr, kr = fr.rotate(q, 3), fr.rotate(k, 3)
    assert qr.shape[-1] == hadamard_dim(d)
    ref = q.double() @ k.double().transpose(-1, -2)
    torch.testing.assert_close((qr @ kr.transpose(-1, -2)).double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    r = rotation_matrix(3, d)
    padded = torch.nn.functional.pad(q.double(), (0, hadamard_dim(d) - d))
    torch.testing.assert_close(qr.double(), padded @ r, atol=1e-5, rtol=0)


def test_rotation_spreads_an_outlier():
    x = _rand(1, 1, 4, 128, seed=4) * 0.01
    x[0, 0, 1, 17] = 100.0
    y = fr.rotate(x, 0)
    assert y[0, 0, 1].abs().max() < 100.0 / math.sqrt(128) * 1.01      # spread evenly over the row


# --- quantization ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", ["block", "tensor"])
def test_quantize_round_trip_error_bound(scaling):
    """Round to nearest e4m3: |x - deq| <= 2^-4 |x| for normal values, <= 2^-10 scale below 2^-6 scale."""
    x = _rand(2, 3, 77, 64, seed=5) * torch.linspace(0.01, 30, 77).view(1, 1, -1, 1)
    x8, scale = fr.quantize(x, 32, scaling=scaling)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 3)
    deq = fr.dequantize(x8, scale, 32)
    srow = scale.repeat_interleave(32, -1)[..., :77, None]
    bound = torch.maximum(x.abs() * 2.0 ** -4, srow * 2.0 ** -10) * (1 + 1e-6)
    assert ((deq - x).abs() <= bound).all()
    assert (deq.abs() <= srow * FP8_MAX * (1 + 1e-6)).all()
    if scaling == "block":                         # every tile uses the full e4m3 range
        tiles = torch.nn.functional.pad(x8.float(), (0, 0, 0, 96 - 77)).reshape(2, 3, 3, -1).abs()
        assert (tiles.amax(-1) == FP8_MAX).all()
    else:
        assert (scale == scale.flatten()[0]).all() and x8.float().abs().max() == FP8_MAX
        torch.testing.assert_close(scale.flatten()[0], x.abs().max() / FP8_MAX)


def test_block_scales_confine_an_outlier_to_its_tile():
    x = _rand(1, 1, 128, 64, seed=6)
    base8, base_s = fr.quantize(x, 32)
    y = x.clone()
    y[0, 0, 40, 3] = 1e6        # in tile 1 (rows 32..63): the others fall below e4m3's normal range there
    y8, ys = fr.quantize(y, 32)
    assert torch.equal(ys[..., [0, 2, 3]], base_s[..., [0, 2, 3]]) and ys[0, 0, 1] > 100 * base_s[0, 0, 1]
    for t in (0, 2, 3):
        rows = slice(32 * t, 32 * t + 32)
        assert torch.equal(y8[..., rows, :].view(torch.uint8), base8[..., rows, :].view(torch.uint8))
    def rms(t):
        return t.pow(2).mean().sqrt()

    err = fr.dequantize(y8, ys, 32) - y
    err[0, 0, 40, 3] = 0
    assert rms(err[..., 32:64, :]) > 10 * rms(err[..., :32, :])             # the outlier's tile lost precision
    t8, ts = fr.quantize(y, 32, scaling="tensor")
    terr = fr.dequantize(t8, ts, 32) - y
    for t in (0, 2, 3):                                                      # a tensor scale spoils every tile
        assert rms(terr[..., 32 * t:32 * t + 32, :]) > 10 * rms(err[..., 32 * t:32 * t + 32, :])


def test_zero_tile_gets_unit_scale():
    x = torch.zeros(1, 1, 40, 16)
    x[..., 32:, :] = 1.0
    x8, s = fr.quantize(x, 32)
    assert s[0, 0, 0] == 1.0 and (x8[..., :32, :].float() == 0).all()


# --- recipe and flags -------------------------------------------------------------------------------------

def test_recipe_roundtrip_and_errors():
    r = Fp8Recipe("tensor", False, 42)
    assert Fp8Recipe.loads(r.dumps()) == r and Fp8Recipe.loads("") is None
    assert "Hadamard" in Fp8Recipe().describe()
    with pytest.raises(ValueError, match="scaling"):
        Fp8Recipe("channel")
    with pytest.raises(ValueError, match="seed"):
        Fp8Recipe(seed=-1)
    with pytest.raises(ValueError, match="recipe"):
        Fp8Recipe.loads("int8;scaling=block")


def test_fp8_flags_from_env_and_options(monkeypatch):
    for name in ("FA3_FP8", "FA3_FP8_HADAMARD", "FA3_FP8_SCALING", "FA3_FP8_SEED"):
        monkeypatch.delenv(name, raising=False)
    assert from_env().fp8_arg() == ""
    monkeypatch.setenv("FA3_FP8", "1")
    assert Fp8Recipe.loads(from_env().fp8_arg()) == Fp8Recipe("block", True, 0)      # Hadamard on by default
    monkeypatch.setenv("FA3_FP8_HADAMARD", "0")
    monkeypatch.setenv("FA3_FP8_SCALING", "tensor")
    monkeypatch.setenv("FA3_FP8_SEED", "9")
    assert Fp8Recipe.loads(from_env().fp8_arg()) == Fp8Recipe("tensor", False, 9)
    cfg, rest = from_env().with_options({"fp8": False, "fp8_seed": 3, "max_autotune": False})
    assert cfg.fp8_arg() == "" and cfg.fp8_seed == 3 and rest == {"max_autotune": False}
    cfg, _ = Config().with_options({"fp8": True, "fp8_scaling": "block"})
    assert Fp8Recipe.loads(cfg.fp8_arg()) == Fp8Recipe("block", True, 0)
    monkeypatch.setenv("FA3_FP8_SEED", "x")
    with pytest.raises(ValueError, match="FA3_FP8_SEED"):
        from_env()
    monkeypatch.setenv("FA3_FP8_SEED", "1")
    monkeypatch.setenv("FA3_FP8_SCALING", "row")
    with pytest.raises(ValueError, match="fp8_scaling"):
        from_env()
    with pytest.raises(ValueError, match="fp8"):
        Config(fp8="yes").validate()


def _site(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v


def _graph_args(cfg, *args):
    """Rewrite the site with cfg; return the args of the fa3 op call and the report."""
    torch._dynamo.reset()
    seen = {}

    def backend(gm, example_inputs, **_):
        seen["report"] = rewrite_graph(gm, cfg)
        seen["args"] = [n.args for n in gm.graph.nodes if n.target is torch.ops.fa3.attention.default]
        return gm.forward

    out = torch.compile(_site, backend=backend)(*args)
    return seen["args"], seen["report"], out


def test_fp8_choice_reaches_the_op():
    args = [_rand(1, 2, 24, 64, seed=n, dtype=torch.float16) for n in range(3)]
    plain, _, _ = _graph_args(Config(), *args)
    fp8, report, _ = _graph_args(Config(fp8=True, fp8_scaling="tensor", fp8_seed=5), *args)
    assert len(plain[0]) == 6                               # 16-bit graphs are unchanged
    assert Fp8Recipe.loads(fp8[0][6]) == Fp8Recipe("tensor", True, 5)
    assert plain[0][4:6] == fp8[0][4:6]
    assert report.sites[0].note                             # FP8 asked for: the report says what happens


def test_fallback_is_reported_and_logged(monkeypatch, caplog):
    """No FP8 kernel can serve (CPU without the interpreter; fp32): the site runs 16-bit, and says why."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = [_rand(1, 2, 24, 64, seed=n, dtype=torch.float16) for n in range(3)]
    _, report, out = _graph_args(Config(fp8=True), *args)
    assert report.rewritten == 1
    assert "fp8 not possible" in report.sites[0].note and "does not run on cpu" in report.sites[0].note
    assert "fp8 not possible" in str(report)
    torch.testing.assert_close(out, _site(*args), atol=2e-3, rtol=2e-3)   # the 16-bit reference ran
    monkeypatch.setenv("FA3_FP8", "1")
    assert "fp8 not possible" in fa3_inductor.explain(_site, *args).sites[0].note
    fa3_inductor.op._FP8_WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="fa3_inductor"):
        fa3_inductor.attention(*args, fp8=True)
    assert any("FP8 requested" in r.message and "does not run on cpu" in r.message for r in caplog.records)


def test_fp8_supports_reasons():
    from fa3_inductor.kernels import fp8_portable
    prog = fa3_inductor.ScoreProgram(("mul", ("score",), ("const", 0.125)))
    r = Fp8Recipe()
    q = torch.empty(1, 2, 8, 64)
    assert "fp16/bf16" in fp8_portable.supports(prog, q, q, q, [], r)
    wide = torch.empty(1, 2, 8, 320, dtype=torch.float16)
    assert "head dim 320" in fp8_portable.supports(prog, wide, wide, wide, [], r)
    odd = torch.empty(1, 2, 8, 200, dtype=torch.bfloat16)        # rotated width 256: still served
    assert fp8_portable.supports(prog, odd, odd, odd, [], r) is None
    entry, passed = dispatch.select(prog, q, q, q, [], "auto", r)
    assert not entry.fp8 and any(p.startswith("triton_fp8:") for p in passed)
    entry, passed = dispatch.select(prog, q, q, q, [], "reference", r)
    assert entry.name == "reference" and any("kernel=reference" in p for p in passed)


def test_public_fp8_argument_errors():
    q = _rand(1, 1, 4, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="fp8"):
        fa3_inductor.attention(q, q, q, fp8="fast")
    with pytest.raises(ValueError, match="fp8"):
        fa3_inductor.attention(q, q, q, fp8=1.5)


def test_inductor_path_with_fp8_option(monkeypatch):
    """Through Inductor the recipe string is a constant argument of the op; on CPU it falls back to 16-bit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = [_rand(2, 2, 17, 32, seed=n) for n in range(3)]
    torch._dynamo.reset()
    out = torch.compile(_site, backend="fa3", options={"fp8": True, "fp8_seed": 4})(*args)
    torch.testing.assert_close(out, _site(*args), atol=2e-5, rtol=1e-4)
