"""dispatch.select's memo key (fa3_inductor/dispatch.py `_select_key`): k, v and the operands enter it with their
key length by class, so that a DynamicCache growing by a key per call hits one memo entry per class. Sound only if
every entry's `supports` answers alike for all tensors of a class: checked here against `_select` itself (the
whole table's answer and reasons), on the CPU path and with the sm_90 entries made to run on CPU tensors (their
`supports` then runs: Hopper's TMA rules, the decode entry's limits, FP8's). Where a tensor of the class could
reach the portable kernels' 2^31 bounds, or is not contiguous, and for more than 16 queries per head (a prefill),
the key is exact.
"""

from __future__ import annotations

import random

import pytest
import torch

from fa3_inductor import dispatch
from fa3_inductor.kernels import hopper
from fa3_inductor.kernels.fp8_recipe import Fp8Recipe
from fa3_inductor.kernels.program import ScoreProgram

SCALED = ("mul", ("score",), ("const", 0.125))
PROGS = [ScoreProgram(SCALED), ScoreProgram(SCALED, causal="bottom_right"),
         ScoreProgram(("where", ("operand", 0), SCALED, ("const", -float("inf"))), 1),
         ScoreProgram(("add", SCALED, ("operand", 0)), 1, operand_grad=(True,))]


@pytest.fixture(params=["cpu", "sm90"])
def path(request, monkeypatch):
    if request.param == "sm90":     # bench/host_counts.py's stand-in: the H100's entries answer for CPU tensors
        monkeypatch.setattr(dispatch, "_runs_on", lambda entry, device: device in entry.devices or device == "cpu")
        monkeypatch.setattr(hopper, "_not_sm90", lambda device: None)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def _same_class(rng, n):
    """Another length with n's class: the same bit length and the same low four bits."""
    if n <= 16:
        return n
    while True:
        m = rng.randrange(1 << (n.bit_length() - 1), 1 << n.bit_length())
        if m & 15 == n & 15:
            return m


def _call(rng, prog, b, hq, hk, sq, sk, d, dv, dtype, shift):
    """(q, k, v, operands) with contiguous K/V of length sk, `shift` elements into their buffers (alignment)."""
    q = torch.empty(b, sq, hq, d, dtype=dtype).transpose(1, 2)
    k = torch.empty(b * hk * sk * d + shift, dtype=dtype)[shift:].view(b, hk, sk, d)
    v = torch.empty(b * hk * sk * dv + shift, dtype=dtype)[shift:].view(b, hk, sk, dv)
    ops = []
    if prog.n_operands:
        if prog.expr[0] == "where":
            ops = [torch.zeros(b, 1, 1, sk, dtype=torch.bool)]
        else:
            ops = [torch.zeros(b, hq, sq, sk, dtype=dtype)]
    return q, k, v, ops


def test_supports_answers_alike_across_a_class(path):
    rng = random.Random(0)
    seen_classed = 0
    for _ in range(150):
        prog = rng.choice(PROGS)
        hk = rng.choice([1, 2, 8])
        hq = hk * rng.choice([1, 4, 8, 16, 32])
        sq = rng.choice([1, 2, 4, 16, 17, 64])
        d = rng.choice([64, 80, 96, 128, 256, 288])
        dv = rng.choice([d, d, 64])
        dtype = rng.choice([torch.float16, torch.float32, torch.bfloat16])
        shift = rng.choice([0, 0, 1, 8])
        fp8 = rng.choice([None, None, Fp8Recipe()])
        sk = rng.choice([rng.randrange(1, 17), rng.randrange(17, 600), rng.randrange(600, 3000)])
        sk2 = _same_class(rng, sk)
        one = _call(rng, prog, 1, hq, hk, sq, sk, d, dv, dtype, shift)
        two = _call(rng, prog, 1, hq, hk, sq, sk2, d, dv, dtype, shift)
        key1 = dispatch._select_key(prog, *one, "auto", fp8)
        key2 = dispatch._select_key(prog, *two, "auto", fp8)
        if sq > dispatch.CLASSED_QUERIES:       # a prefill's key is exact
            assert key1[6] and (key1 == key2) == (sk == sk2)
            continue
        assert key1 == key2, (sk, sk2)
        seen_classed += sk != sk2 and not key1[6]
        assert dispatch._select(prog, *one, "auto", fp8) == dispatch._select(prog, *two, "auto", fp8), (sk, sk2)
    assert seen_classed > 40


def test_lengths_of_another_class_get_another_key(path):
    prog = PROGS[1]
    keys = {dispatch._select_key(prog, *_call(None, prog, 1, 32, 8, 1, sk, 128, 128, torch.float16, 0), "auto",
                                 None) for sk in (16, 17, 18, 33, 34, 36, 40, 48, 63, 64, 81)}
    assert len(keys) == 11


def test_memo_hits_once_per_class(path, monkeypatch):
    calls = []
    real = dispatch._select
    monkeypatch.setattr(dispatch, "_select", lambda *a: calls.append(a) or real(*a))
    dispatch._SELECTED_CLASS.clear()
    prog = PROGS[1]
    for sk in range(1000, 1100):      # a DynamicCache, one key longer per call
        dispatch.select(prog, *_call(None, prog, 1, 32, 8, 1, sk, 128, 128, torch.float16, 0))
    assert len(calls) == 32           # 10 and 11 bits long, 16 values of the low four bits
    assert len(dispatch._SELECTED_CLASS) == 32
    dispatch._SELECTED_CLASS.clear()


class _Big:
    """Shape, contiguity, size, dtype and pointer of a tensor too large to allocate here."""

    def __init__(self, shape, contiguous=True):
        self.shape, self.dtype, self._c = torch.Size(shape), torch.float16, contiguous

    def is_contiguous(self):
        return self._c

    def numel(self):
        return self.shape.numel()

    def stride(self):
        return (0,) * len(self.shape)

    def data_ptr(self):
        return 0


def test_a_class_that_may_reach_2_31_is_not_classed():
    assert dispatch._kv_key(_Big((1, 8, (1 << 19) + 5, 128)), 2) is not None     # below 2^30 elements
    assert dispatch._kv_key(_Big((1, 8, 1 << 20, 128)), 2) is None               # 20 bits: up to 2^31 - 1024
    assert dispatch._kv_key(_Big((1, 8, 1 << 20, 128), contiguous=False), 2)[1] == (0, 0, 0, 0)   # exact
    assert dispatch._kv_key(_Big((1, 8, 128, 1 << 20)), 3) is None                   # an operand's key axis
    assert dispatch._kv_key(_Big((1, 8, 1000, 1)), 2)[1] == (0, 0, 0, 0)          # a free last stride: exact
    assert dispatch._kv_key(_Big((8, 1000, 1)), 2)[1] == (0, 0, 0)                 # not 4-D: exact


def test_a_large_operand_gradient_buffer_keeps_the_key_exact(path):
    prog = PROGS[0]
    q = torch.empty(64, 16, 128, 8, dtype=torch.float16).transpose(1, 2)         # B·Hq·Sq = 2^17
    kv = torch.empty(64, 1, 20000, 8, dtype=torch.float16)
    assert dispatch._select_key(prog, q, kv, kv, [], "auto", None)[6]          # 2^17·(2^15 - 1) >= 2^31
    small = torch.empty(64, 1, 2000, 8, dtype=torch.float16)
    assert not dispatch._select_key(prog, q, small, small, [], "auto", None)[6]
