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
    launcher._run((ck, ("BLOCK",)), (3, 2), (10, 11), {"BLOCK": 64})
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
