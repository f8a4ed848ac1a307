"""The rotated-rounds timing of bench/models.py and bench/train.py (bench/common.py): every variant timed once per
round in an order rotated per round, the budget cutting later rounds only, and the verdict "within noise" exactly
where two [min, max] ranges over rounds overlap; bench/models.py's summary takes the best baseline over both
attention implementations from medians."""

from __future__ import annotations


import pytest

pytest.importorskip("transformers")

from helpers import import_bench  # noqa: E402

common, models = import_bench("common", "models")


class _Spent:
    def left(self) -> float:
        return 0.0


def test_rotated_rounds_order():
    seen = []
    assert common.rotated_rounds(list("abc"), 4, seen.append) == 4
    assert "".join(seen) == "abc" "bca" "cab" "abc"


def test_rotated_rounds_budget_keeps_first_round():
    seen = []
    assert common.rotated_rounds(list("ab"), 5, seen.append, _Spent()) == 1
    assert seen == ["a", "b"]


@pytest.mark.parametrize("ms, base, verdict", [
    ((1.0, 0.9, 1.1), (1.05, 1.0, 1.2), "within noise"),     # overlapping ranges, different medians
    ((1.0, 0.9, 1.0), (1.1, 1.0, 1.2), "within noise"),      # touching at 1.0
    ((1.0, 0.9, 0.99), (1.1, 1.0, 1.2), "faster"),
    ((1.3, 1.21, 1.4), (1.1, 1.0, 1.2), "slower"),
])
def test_versus(ms, base, verdict):
    assert common.versus(ms, base) == verdict


def _row(impl, mode, ms, lo, hi):
    return {"model": "m", "impl": impl, "shape": "2x8", "mode": mode, "ms": ms, "ms_min": lo, "ms_max": hi,
            "err": 0.0, "rounds": 5, "rounds_asked": 5, "attention_calls": 2,
            **({"graphs": 1, "recompiles": 0, "sites_rewritten": 2, "sites_skipped": []} if mode != "eager" else {})}


def test_summary_best_baseline_and_noise():
    rows = [_row("eager", "eager", 9.0, 8.8, 9.3), _row("eager", "inductor", 4.0, 3.9, 4.4),
            _row("eager", "fa3", 3.0, 2.9, 3.1),
            _row("sdpa", "eager", 5.0, 4.9, 5.2), _row("sdpa", "inductor", 3.5, 3.2, 3.6),
            _row("sdpa", "fa3", 3.4, 3.3, 3.7)]
    by_impl = {r["impl"]: r for r in models.summarize(rows)}
    for r in by_impl.values():     # the fastest median of eager / Inductor over both implementations
        assert r["best_baseline"] == "sdpa inductor" and r["best_baseline_ms"] == 3.5
    assert by_impl["eager"]["speedup_vs_best"] == pytest.approx(3.5 / 3.0)
    assert by_impl["eager"]["vs_best_resolved"] == "faster"
    assert by_impl["eager"]["vs_inductor_resolved"] == "faster"
    assert by_impl["sdpa"]["speedup_vs_best"] == pytest.approx(3.5 / 3.4)
    assert by_impl["sdpa"]["vs_best_resolved"] == "within noise"
    lines = models.markdown(models.summarize(rows), ["# t"])
    assert any("| m | sdpa |" in ln and "3.40 [3.30, 3.70]" in ln and "within noise" in ln for ln in lines)


def test_summary_fp8_row_is_not_a_baseline():
    fp8 = {**_row("sdpa", "fa3-fp8", 2.0, 1.9, 2.1), "rms_err": 0.02, "kernels": {"forward:hopper_fp8": 4}}
    rows = [_row("sdpa", "eager", 5.0, 4.9, 5.2), _row("sdpa", "inductor", 3.5, 3.2, 3.6),
            {**_row("sdpa", "fa3", 3.0, 2.9, 3.1), "rms_err": 0.004}, fp8]
    (r,) = models.summarize(rows)
    assert r["best_baseline"] == "sdpa inductor"          # an fa3 mode never counts as a baseline
    assert r["speedup_vs_best"] == pytest.approx(3.5 / 3.0)
    assert r["fp8_speedup_vs_fa3"] == pytest.approx(3.0 / 2.0) and r["fp8_vs_fa3_resolved"] == "faster"
    assert r["fa3-fp8_rms_err"] == 0.02 and r["fa3_rms_err"] == 0.004
    lines = models.markdown([r], ["# t"])
    fp8_rows = [ln for ln in lines if ln.startswith("| m | sdpa |") and "hopper_fp8×4" in ln]
    assert len(fp8_rows) == 1 and "1.50 | faster" in fp8_rows[0] and "2.0e-02" in fp8_rows[0]
    # without a timed fa3-fp8 mode the FP8 table is absent
    assert not any("FP8 end to end" in ln for ln in models.markdown(models.summarize(rows[:3]), ["# t"]))


def test_rms_err_ignores_undefined_positions():
    import torch
    ref = torch.tensor([[3.0, 4.0], [1e9, 1e9]])
    out = torch.tensor([[3.0, 4.5], [0.0, 0.0]])
    valid = torch.tensor([True, False])
    assert models.rms_err(out, ref, valid) == pytest.approx(0.5 / 5.0)
    assert models.rms_err(torch.full_like(ref, float("nan")), ref, None) == float("inf")
