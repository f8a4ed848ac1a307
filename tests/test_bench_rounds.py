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
