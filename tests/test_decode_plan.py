"""The split-KV decode's plan (kernels/triton_decode.py `_Plan`) without a GPU: what a call launches, and which
compiled kernel it may reuse.

Launches are recorded, not run (`kernel[grid](...)` is replaced). For K/V one key longer on every call (a
DynamicCache: contiguous, outer strides growing) and for a StaticCache's fixed shapes with a mask operand, each
call's two launches are exactly what `launch_args` derives from scratch (kernels, grids, constexprs, integer
arguments, tensors by data pointer). A plan's launch site may start the kernel compiled by its first launch only
if Triton would specialise every later launch through it the same way: checked against Triton's own binder
(argument types, value-1 constants, divisibility by 16, pointer alignment) as K/V lengths cross multiples of 16
and pointers lose their alignment. 300 calls of a growing cache through the whole op add no cache entries once
the few specialisations have been seen. Whether the kernels compute the right numbers is
tests/test_decode_kernel.py's (interpreter) and tests/gpu's job.
"""

from __future__ import annotations

import math

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import KernelInterface, create_function_from_signature

from fa3_inductor.kernels import launcher
from fa3_inductor.kernels import triton_decode as td
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram

import plan_checks

S = ("score",)


@pytest.fixture
def recorded(monkeypatch):
    """Every kernel[grid](*args, **kwargs) is appended to the returned list instead of running; each launch a
    Site makes through launcher.launch is recorded with the Site's key."""
    calls = []

    def getitem(kernel, grid):
        return lambda *args, **kwargs: calls.append((kernel, grid, args, kwargs))

    original = launcher.launch

    def launch(key, kernel, grid, args, kwargs):
        n = len(calls)
        original(key, kernel, grid, args, kwargs)
        assert len(calls) == n + 1
        calls[-1] = calls[-1] + (key,)

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    monkeypatch.setattr(launcher, "launch", launch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    td._PLANS.clear()
    yield calls
    td._PLANS.clear()


def _growing(b, hk, d, lengths, offset=0):
    """K / V as a DynamicCache leaves them after torch.cat: contiguous, one flat buffer per length."""
    for sk in lengths:
        flat = torch.randn(offset + 2 * b * hk * sk * d).half()[offset:]
        yield sk, flat[:b * hk * sk * d].view(b, hk, sk, d), flat[b * hk * sk * d:].view(b, hk, sk, d)


def _arg(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", a.data_ptr(), a.dtype)
    assert type(a) in (int, bool), type(a)
    return a


def _launch(kernel, grid, args, kwargs):
    return (id(kernel), tuple(grid), tuple(_arg(a) for a in args), sorted(kwargs.items()))


def _expected(q, k, v, ops, prog, out, lse, recorded_decode):
    """The two launches launch_args (and the combine's formula) derive from scratch for this call, on the
    partial buffers the call used (the decode launch's 6th and 7th arguments, viewed as (B, Hq, Sq, splits, Dv)
    and (B, Hq, Sq, splits))."""
    b, hq, sq, _ = q.shape
    hk, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    n_split, chunk = td.split_plan(b, hk, sk, q.device)
    if n_split == 1:
        part, lpart = out, lse
    else:
        flat_part, flat_lpart = recorded_decode[2][5], recorded_decode[2][6]
        part = flat_part.as_strided((b, hq, sq, n_split, dv), (hq * sq * n_split * dv, sq * n_split * dv,
                                                               n_split * dv, dv, 1))
        lpart = flat_lpart.as_strided((b, hq, sq, n_split), (hq * sq * n_split, sq * n_split, n_split, 1))
    launches = [td.launch_args(q, k, v, ops, prog, out, lse, part, lpart, n_split, chunk, td.INTERPRET_CONFIG)]
    if n_split > 1:
        combine = tp._prepare(q, k, v, ops, prog, "decode")[1].attn_decode_combine
        launches.append((combine, (sq, hq, b),
                         (part, lpart, out, lse, *part.stride(), *lpart.stride(), *out.stride(), *lse.stride(),
                          n_split),
                         dict(BLOCK_S=max(2, td._next_pow2(td.split_cap(b, hk, q.device))))))
    return [_launch(*x) for x in launches]


def _where(d):
    return ScoreProgram(("where", ("operand", 0), ("mul", S, ("const", d ** -0.5)), ("const", -math.inf)), 1)


def _causal(d):
    return ScoreProgram(("mul", S, ("const", d ** -0.5)), causal="bottom_right")


def test_growing_cache_launches_what_launch_args_derives(recorded):
    b, hq, hk, d = 2, 8, 2, 32
    q = torch.randn(b, 1, hq, d).half().transpose(1, 2)
    prog = _causal(d)
    for sk, k, v in _growing(b, hk, d, range(1, 70)):
        recorded.clear()
        out, lse = td.forward(q, k, v, [], prog)
        got = [_launch(*c[:4]) for c in recorded]
        assert got == _expected(q, k, v, [], prog, out, lse, recorded[0]), sk
    assert len(td._PLANS) == 1


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 96), (2, 1, 2, 96), (1, 8, 2, 96)])
def test_static_cache_with_mask_launches_what_launch_args_derives(recorded, mask_shape):
    b, hq, hk, sq, d, smax = 2, 8, 4, 2, 64, 96
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(b, hk, smax, d, generator=gen).half() for _ in range(2))
    mask = torch.rand(*mask_shape, generator=gen) > 0.3
    prog = _where(d)
    for step in range(3):
        q = torch.randn(b, sq, hq, d, generator=gen).half().transpose(1, 2)    # fresh data pointers
        recorded.clear()
        out, lse = td.forward(q, k, v, [mask], prog)
        got = [_launch(*c[:4]) for c in recorded]
        assert got == _expected(q, k, v, [mask], prog, out, lse, recorded[0]), step


def _specialisation(kernel, args, kwargs):
    """What Triton's binder makes of this launch: per parameter its type and specialisation (or constexpr
    value), and the options — the compiled-kernel cache key, less the target."""
    binder = getattr(kernel, "_test_binder", None)
    if binder is None:
        binder = kernel._test_binder = create_function_from_signature(kernel.signature, kernel.params, BaseBackend)
    _, spec, options = binder(*args, **kwargs)
    return tuple(spec), tuple(sorted(options.items()))


def test_a_site_only_sees_launches_triton_specialises_alike(recorded):
    """Lengths crossing multiples of 16 (Sk, the causal offset, the K / V strides), an unaligned q and an
    unaligned cache: every launch through one site has the specialisation of that site's first launch, and a
    launch Triton specialises differently never goes through a site made for another."""
    b, hq, hk, d = 1, 4, 1, 24         # d = 24: K / V outer strides are multiples of 16 only for some lengths
    prog = _causal(d)
    by_site, by_spec = {}, {}
    buf = torch.randn(1 + b * hq * d).half()
    for q in (torch.randn(b, 1, hq, d).half().transpose(1, 2), buf[1:].view(b, 1, hq, d).transpose(1, 2)):
        for offset in (0, 3):
            for sk, k, v in _growing(b, hk, d, range(10, 60), offset):
                n_split = td.split_plan(b, hk, sk, q.device)[0]
                recorded.clear()
                td.forward(q, k, v, [], prog)
                for kernel, grid, args, kwargs, key in recorded:
                    spec = _specialisation(kernel, args, kwargs)
                    assert by_site.setdefault(key, spec) == spec, (sk, key)
                    # and no more decode sites than Triton has variants (a site also pins the split count: the
                    # grid); the combine's sites follow the decode's
                    if kernel.fn.__name__ == "attn_decode":
                        assert by_spec.setdefault((spec, n_split), key) == key, (sk, key)
    # the K / V strides' divisibility and the pointers' alignment did flip, and took their own sites
    assert len(set(by_site.values())) >= 8
    assert q.data_ptr() % 16 != 0


def test_sk_is_not_specialised_on(recorded):
    """The decode kernels are told not to specialise on the lengths (the template's do_not_specialize): the plan
    reads that from the kernel, and then a growing cache keeps its sites across multiples of 16."""
    q = torch.randn(1, 4, 1, 32).half()
    k, v = (torch.randn(1, 1, 40, 32).half() for _ in range(2))
    td.forward(q, k, v, [], _causal(32))
    assert next(iter(td._PLANS.values())).loose_lengths


def test_int_classes_are_tritons():
    from triton._C.libtriton import native_specialize_impl
    values = [0, 1, 2, 15, 16, 17, -1, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, -2 ** 31, -2 ** 31 - 16,
              2 ** 40 + 16, 2 ** 63 - 16, 2 ** 63, 2 ** 64 - 16]
    triton = [native_specialize_impl(BaseBackend, x, False, True, True) for x in values]
    ours = launcher.int_classes(values)
    # equal classes exactly where Triton's (type, specialisation) pairs are equal
    for i in range(len(values)):
        for j in range(len(values)):
            assert (ours[i] == ours[j]) == (triton[i] == triton[j]), (values[i], values[j])
    small = [x for x in values if -2 ** 31 <= x < 2 ** 31]
    small_classes = launcher.int_classes(small)
    for i in range(len(small)):
        for j in range(len(small)):
            a = native_specialize_impl(BaseBackend, small[i], False, True, True)
            c = native_specialize_impl(BaseBackend, small[j], False, True, True)
            assert (small_classes[i] == small_classes[j]) == (a == c)


def test_plan_holds_no_tensors(recorded):
    b, hq, hk, d = 1, 4, 2, 32
    q = torch.randn(b, hq, 1, d).half()
    mask = torch.ones(b, 1, 1, 40, dtype=torch.bool)
    k, v = (torch.randn(b, hk, 40, d).half() for _ in range(2))
    td.forward(q, k, v, [mask], _where(d))
    held = plan_checks.tensors_held(list(td._PLANS.values()))
    assert not held, held


def test_no_cache_grows_over_300_tokens_of_a_dynamic_cache(monkeypatch):
    """The whole op (dispatch, plan, launches) with the launcher's first launch per key leaving a compiled entry
    as on a GPU: after the first few lengths have shown every specialisation, 300 more add no entry anywhere but
    the select memo's classes (dispatch._select_key), at most 16 per bit length of the key length."""
    from fa3_inductor import dispatch
    compiled = {}

    def launch(key, kernel, grid, args, kwargs):
        compiled[key] = launcher._COMPILED[key] = ("recorded", ())

    monkeypatch.setattr(launcher, "launch", launch)
    monkeypatch.setattr(launcher, "_run", lambda hit, grid, args, kwargs: None)
    monkeypatch.setattr(dispatch, "_runs_on", lambda entry, device: device in entry.devices or device == "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    b, hq, hk, d = 1, 8, 2, 64
    q = torch.randn(b, 1, hq, d).half().transpose(1, 2)
    s = _causal(d).dumps()
    flat = torch.empty(2 * b * hk * 400 * d, dtype=torch.float16)
    dispatch._SELECTED_CLASS.clear()

    def sizes():
        n = len(launcher._COMPILED) + len(tp._TUNED) + len(tp._SPECS) + len(dispatch._SELECTED_BWD)
        n += sum(len(x) for x in dispatch._SELECTED.values())
        return n + sum(1 + len(p.sites) + len(p.cfgs) for p in td._PLANS.values())

    counts = []
    for sk in range(40, 400):
        k = flat[:b * hk * sk * d].view(b, hk, sk, d)
        v = flat[b * hk * sk * d:2 * b * hk * sk * d].view(b, hk, sk, d)
        for layer in range(2):
            torch.ops.fa3.attention(q, k, v, [], s, "auto", "")
        counts.append(sizes())
    assert dispatch.STATS[("forward", "triton-decode")] >= 2 * 360
    assert counts[-1] == counts[59], counts[59:]
    assert len(dispatch._SELECTED_CLASS) <= 16 * 4      # lengths of 6 to 9 bits
    assert len(compiled) <= 6, len(compiled)       # decode and combine sites of the split counts 1 to 3


def test_select_memo_keeps_a_fixed_key_while_another_grows(monkeypatch):
    """dispatch.select's memo per query layout: a DynamicCache's self-attention (a new K / V length every token)
    and a cross-attention (fixed K / V) of the same queries; the fixed one is never selected again, the growing
    one once per class of its length (bit length, low four bits: tests/test_select_class.py), and the
    memo stays at its bound."""
    from fa3_inductor import dispatch
    runs = []
    real = dispatch._select

    def counted(*args):
        runs.append(args[2].shape[2])
        return real(*args)

    monkeypatch.setattr(dispatch, "_select", counted)
    dispatch._SELECTED.clear(), dispatch._SELECTED_CLASS.clear()
    prog = _causal(32)
    q = torch.randn(1, 4, 1, 32).half()
    cross = torch.randn(1, 2, 77, 32).half()
    for sk in range(100, 140):
        k = torch.randn(1, 2, sk, 32).half()
        for _ in range(3):
            assert dispatch.select(prog, q, k, k, []) == real(prog, q, k, k, [])
            assert dispatch.select(prog, q, cross, cross, []) == real(prog, q, cross, cross, [])
    classes, first = set(), []
    for sk in [77] + list(range(100, 140)):     # 101 falls in 77's class
        c = (sk.bit_length(), sk & 15)
        if c not in classes:
            classes.add(c)
            first.append(sk)
    assert runs == [100, 77] + first[2:] and len(first) == 28
    assert sum(len(x) for x in dispatch._SELECTED.values()) == 0 and len(dispatch._SELECTED_CLASS) == 28
