"""The FP8 kernel's exp2 on the FMA pipe (kernels/fp8_exp2.py): its arithmetic in torch against torch.exp2 over
the whole float range the softmax can feed it, masked scores (-inf) included, and the PTX it generates."""

from __future__ import annotations

import re

import pytest
import torch

from fa3_inductor.kernels import fp8_exp2 as fe


def test_coefficients_are_float32_and_p0_is_one():
    for c in (fe.C1, fe.C2, fe.C3, fe.CLAMP, fe.MAGIC):
        assert torch.tensor(c, dtype=torch.float32).item() == c
    # p(0) = 1 exactly is what makes 2^-127 (the clamp) come out as +0.0
    assert fe.reference(torch.tensor([0.0, 1.0, -1.0, 8.0])).tolist() == [1.0, 2.0, 0.5, 256.0]


def test_relative_error_over_the_normal_range():
    x = torch.cat([torch.linspace(-126.0, 12.0, 2_000_001), torch.randn(100_000) * 30 - 20]).clamp(-126.0, 12.0)
    want = torch.exp2(x.double())
    got = fe.reference(x).double()
    rel = ((got - want) / want).abs()
    assert rel.max().item() <= fe.MAX_REL_ERR * 1.01, rel.max().item()
    # unbiased enough that e4m3 (2^-4 relative steps) cannot see it; and monotone across integer boundaries
    assert abs(((got - want) / want).mean().item()) < 2e-5
    ints = torch.arange(-120.0, 12.0)
    below = fe.reference(ints - 2 ** -20)
    assert bool((below <= fe.reference(ints) * (1 + fe.MAX_REL_ERR)).all())


def test_masked_and_very_negative_scores_give_zero_never_nan():
    x = torch.tensor([float("-inf"), -3.4e38, -1e30, -1e4, -200.0, -127.5, -127.0])
    got = fe.reference(x)
    assert not torch.isnan(got).any()
    assert got.tolist() == [0.0] * len(x) and not torch.signbit(got).any()


def test_between_127_and_126_is_a_tiny_positive_subnormal():
    # p's mantissa read as a subnormal: not 2^x, but in [0, 2^-126] and monotone (256 p in e4m3 is 0 either way)
    x = torch.linspace(-127.0, -126.0, 1001)[1:-1]
    got = fe.reference(x)
    assert bool((got > 0).all()) and bool((got <= 2.0 ** -126).all())
    assert bool((got[1:] >= got[:-1]).all())
    assert fe.reference(torch.tensor([-126.0])).item() == 2.0 ** -126


@pytest.mark.parametrize("emulated", range(1, fe.PACK + 1))
def test_ptx_splits_the_pack(emulated):
    text = fe.asm(emulated)
    assert text.count("add.rm.ftz.f32") == emulated
    assert text.count("ex2.approx.ftz.f32") == fe.PACK - emulated
    outs = {int(n) for n in re.findall(r"\$(\d+)", text)}
    assert outs == set(range(2 * fe.PACK))
    assert len(fe.constraints().split(",")) == 2 * fe.PACK


def test_ptx_rejects_bad_counts():
    for bad in (0, fe.PACK + 1, -1):
        with pytest.raises(ValueError):
            fe.asm(bad)
