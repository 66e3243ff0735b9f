"""benchmarks/repeats.py on synthetic timings: rotation order, spreads, and when a ratio may be claimed."""

import importlib.util
import itertools
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "repeats.py"
_spec = importlib.util.spec_from_file_location("bench_repeats", _PATH)
repeats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repeats)


def test_variants_are_measured_in_rotation_so_drift_hits_all_alike():
    calls = []
    drift = itertools.count()  # every measurement slower than the last, as a warming-up machine

    def variant(name):
        def measure():
            calls.append(name)
            return next(drift)
        return measure

    samples = repeats.interleave({"A": variant("A"), "B": variant("B"), "C": variant("C")}, repeats=5)
    assert calls == ["A", "B", "C"] * 5
    assert samples == {"A": [0, 3, 6, 9, 12], "B": [1, 4, 7, 10, 13], "C": [2, 5, 8, 11, 14]}
    # The drift moves each variant's median by the same step: no spurious ordering beyond it.
    medians = [repeats.Spread.of(samples[name]).median for name in "ABC"]
    assert medians == [6, 7, 8]


def test_on_sample_reports_each_measurement():
    seen = []
    repeats.interleave({"A": lambda: 1.0, "B": lambda: 2.0}, repeats=2, on_sample=lambda *a: seen.append(a))
    assert seen == [(0, "A", 1.0), (0, "B", 2.0), (1, "A", 1.0), (1, "B", 2.0)]


def test_spread_is_median_min_max():
    spread = repeats.Spread.of([3.0, 1.0, 2.0, 10.0, 2.5])
    assert (spread.median, spread.low, spread.high, spread.count) == (2.5, 1.0, 10.0, 5)
    assert spread.scaled(1e3).format(1) == "2500.0 (1000.0-10000.0)"
    with pytest.raises(ValueError, match="no measurements"):
        repeats.Spread.of([])


def test_a_ratio_is_claimed_only_where_the_ranges_separate():
    # A noisy variant whose range reaches into both others' allows no ratio to either.
    bf16 = repeats.Spread.of([0.90, 0.91, 0.89, 0.92, 0.90])
    qad = repeats.Spread.of([1.24, 1.25, 1.23, 1.26, 1.38])
    noisy = repeats.Spread.of([1.00, 1.30, 0.91, 1.10, 1.05])
    claim = repeats.ratio_claim(qad, bf16)
    assert claim == f"{1.25 / 0.90:.3f}x ({1.23 / 0.92:.3f}-{1.38 / 0.89:.3f})"
    assert repeats.ratio_claim(noisy, bf16) == repeats.NO_CLAIM
    assert repeats.ratio_claim(qad, noisy) == repeats.NO_CLAIM
    # Touching ends are an overlap.
    assert repeats.ratio_claim(repeats.Spread.of([2, 2, 2, 2, 3]), repeats.Spread.of([1, 1, 1, 1, 2])) == repeats.NO_CLAIM


def test_too_few_repeats_make_no_claim():
    fast, slow = repeats.Spread.of([1.0] * 4), repeats.Spread.of([2.0] * 4)
    assert repeats.ratio_claim(slow, fast) == f"{repeats.NO_CLAIM} (fewer than 5 repeats)"
    assert repeats.ratio_claim(slow, fast, min_repeats=4) == "2.000x (2.000-2.000)"
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        repeats.interleave({"A": lambda: 1.0}, repeats=0)


def test_markdown_table_marks_the_baseline_and_the_claims():
    spreads = {"BF16": repeats.Spread.of([10, 11, 10, 12, 10]),
               "QAD": repeats.Spread.of([14, 14, 15, 13, 14]),
               "QAT": repeats.Spread.of([11, 10, 12, 11, 11])}
    table = repeats.markdown_table(spreads, "BF16", digits=1).splitlines()
    assert table[0] == "| variant | ms, median (min-max) of 5 | vs BF16 |"
    assert table[2] == "| BF16 | 10.0 (10.0-12.0) | baseline |"
    assert table[3] == "| QAD | 14.0 (13.0-15.0) | 1.400x (1.083-1.500) |"
    assert table[4] == f"| QAT | 11.0 (10.0-12.0) | {repeats.NO_CLAIM} |"
    with pytest.raises(ValueError, match="baseline 'FP8'"):
        repeats.markdown_table(spreads, "FP8")
