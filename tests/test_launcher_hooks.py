"""launcher._run (a cached launch) and Triton's launch hooks, without a GPU: with the hook chains empty (Triton
3.6 keeps them as objects) the C launcher is given no hooks and no metadata is built; with a hook added, the hooks
and the metadata are passed as Triton's own launch passes them, and the hook sees the launch."""

from __future__ import annotations

import types

import pytest
from triton import knobs

from fa3_inductor.kernels import launcher


class _Compiled:
    function, packed_metadata = "fn", "packed"

    def __init__(self):
        self.runs, self.metas = [], 0

    def launch_metadata(self, grid, stream, *args):
        self.metas += 1
        return {"grid": grid, "args": args}

    def run(self, *args):
        self.runs.append(args)
        enter, leave, meta = args[7], args[8], args[6]
        if enter is not None:
            enter(meta)
        if leave is not None:
            leave(meta)


def _fake_driver(monkeypatch):
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda dev: 1234)
    monkeypatch.setattr(launcher, "driver", types.SimpleNamespace(active=active))


def test_no_hooks_no_metadata(monkeypatch):
    _fake_driver(monkeypatch)
    if getattr(knobs.runtime.launch_enter_hook, "calls", None) is None:
        pytest.skip("an older Triton: hooks are None or callables, passed through unchanged")
    assert not knobs.runtime.launch_enter_hook.calls and not knobs.runtime.launch_exit_hook.calls
    ck = _Compiled()
    launcher._run((ck, (("BLOCK", None),)), (3, 2), (10, 11), {"BLOCK": 64})
    (run,) = ck.runs
    assert run[:9] == (3, 2, 1, 1234, "fn", "packed", None, None, None) and run[9:] == (10, 11, 64)
    assert ck.metas == 0


def test_a_hook_sees_the_launch(monkeypatch):
    _fake_driver(monkeypatch)
    seen = []
    hook = knobs.runtime.launch_enter_hook
    if getattr(hook, "calls", None) is None:
        pytest.skip("an older Triton: hooks are None or callables")
    hook.add(seen.append)
    try:
        ck = _Compiled()
        launcher._run((ck, ()), (5,), (1, 2), {})
    finally:
        hook.remove(seen.append)
    (run,) = ck.runs
    assert run[7] is knobs.runtime.launch_enter_hook and run[8] is knobs.runtime.launch_exit_hook
    assert ck.metas == 1 and seen == [{"grid": (5,), "args": (1, 2)}]


class _Param:
    def __init__(self, name, default=None, has_default=False):
        self.name, self.default, self.has_default = name, default, has_default


class _Kernel:
    """A JITFunction stand-in: kernel[grid](...) returns the compiled kernel; params carry the defaults."""
    arg_names = ["a", "b", "BLOCK", "OVERLAP", "EMU"]
    params = [_Param("a"), _Param("b"), _Param("BLOCK"), _Param("OVERLAP", True, True), _Param("EMU", 0, True)]

    def __init__(self):
        self.ck, self.slow = _Compiled(), 0

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.slow += 1
            return self.ck
        return call


def test_trailing_defaults_are_cached_and_passed(monkeypatch):
    """A kernel whose call leaves trailing constexprs at their defaults (the Hopper forward's OVERLAP, EMU, ...)
    takes the direct launch from its second call on, with the defaults in the argument list."""
    _fake_driver(monkeypatch)
    monkeypatch.setattr(launcher, "_COMPILED", {})
    kern = _Kernel()
    for _ in range(3):
        launcher.launch(("k", 1), kern, (2,), (10, 11), {"BLOCK": 64, "num_warps": 4})
    assert kern.slow == 1 and len(kern.ck.runs) == 2
    assert all(run[9:] == (10, 11, 64, True, 0) for run in kern.ck.runs)


def test_missing_parameter_without_default_is_not_cached(monkeypatch):
    _fake_driver(monkeypatch)
    monkeypatch.setattr(launcher, "_COMPILED", {})
    kern = _Kernel()
    for _ in range(2):
        launcher.launch(("k", 2), kern, (2,), (10, 11), {"OVERLAP": False})   # BLOCK neither passed nor defaulted
        launcher.launch(("k", 3), kern, (2,), (10, 11), {"BLOCK": 64, "UNKNOWN": 1})
    assert kern.slow == 4 and not kern.ck.runs and not launcher._COMPILED


def test_a_site_passes_what_launch_passes(monkeypatch):
    """launcher.Site resolves the trailing parameters once: its cached launches give the C launcher the same
    argument list as launcher.launch's."""
    _fake_driver(monkeypatch)
    monkeypatch.setattr(launcher, "_COMPILED", {})
    kern = _Kernel()
    site = launcher.Site(("k", 4))
    for _ in range(3):
        site(kern, (2,), (10, 11), {"BLOCK": 64, "num_warps": 4})
    for _ in range(2):
        launcher.launch(("k", 4), kern, (2,), (10, 11), {"BLOCK": 64, "num_warps": 4})
    assert kern.slow == 1 and len(kern.ck.runs) == 4
    assert all(run == kern.ck.runs[0] for run in kern.ck.runs)
    assert kern.ck.runs[0][9:] == (10, 11, 64, True, 0)
