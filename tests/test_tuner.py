"""triton_portable._launch_tuned's choice on a (faked) CUDA device: every candidate is timed in each of
_TUNE_ROUNDS rounds and keeps its best median, so a candidate slowed by one transient window still wins; a
candidate that fails to launch is dropped; the pick is cached per key and relaunched."""

from __future__ import annotations

import types

import pytest
import torch
import triton.testing

from fa3_inductor.kernels import triton_portable as tp

CUDA = types.SimpleNamespace(type="cuda")


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(tp, "_AUTOTUNE", True)
    monkeypatch.setattr(tp, "_capturing", lambda device: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    windows = []

    def do_bench(fn, warmup, rep):
        fn()
        return windows.pop(0)

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    yield windows
    tp._TUNED.pop(("test_kind", "k"), None)


def test_best_median_over_rounds_wins(fake_gpu):
    assert tp._TUNE_ROUNDS == 2
    # round 1: "a" 1.0, "b" 1.3 (a transient window), "c" 1.2; round 2: "a" 1.1, "b" 0.9, "c" 1.2
    fake_gpu += [1.0, 1.3, 1.2, 1.1, 0.9, 1.2]
    launched = []
    best = tp._launch_tuned("test_kind", ("k",), 64, torch.float16, CUDA, launched.append, ["a", "b", "c"])
    assert best == "b" and launched[-1] == "b" and not fake_gpu
    assert tp._launch_tuned("test_kind", ("k",), 64, torch.float16, CUDA, launched.append, ["a", "b", "c"]) == "b"
    assert launched[-1] == "b"


def test_failing_candidate_is_dropped(fake_gpu):
    fake_gpu += [2.0, 1.5]          # "a" twice; "b" never times

    def launch(cfg):
        if cfg == "b":
            raise RuntimeError("out of shared memory")

    assert tp._launch_tuned("test_kind", ("k",), 64, torch.float16, CUDA, launch, ["a", "b"]) == "a"
    assert not fake_gpu
