"""benchmarks/bench_qad_step.py's report: ratios to the BF16 step and of each ModelOpt student's QAD
step to ours only where the repeats' ranges separate (synthetic timings, no model)."""

import sys


def rows(bench, seconds: dict[str, list[float]]) -> dict[str, dict]:
    return {bench.VARIANTS[key]: {"seconds": bench.Spread.of(values), "peak GiB": 1.0, "alloc retries": 0}
            for key, values in seconds.items()}


def test_the_modelopt_student_is_compared_with_qad_where_the_ranges_separate(bench):
    report = bench.report(rows(bench, {
        "bf16": [1.0, 1.1, 0.9, 1.0, 1.2], "teacher": [0.3] * 5, "qat": [1.1] * 5,
        "qad": [1.4, 1.5, 1.6, 1.5, 1.5], "modelopt_mamba_moe": [2.0, 3.0, 2.5, 2.4, 2.6],
        "modelopt": [1.5, 1.6, 1.7, 1.6, 1.6]}), tokens_per_step=4096)
    peer = bench.VARIANTS["modelopt_mamba_moe"]
    assert f"{peer} / QAD = 1.667x (1.250-2.143)." in report  # 2.5 / 1.5; 2.0 / 1.6; 3.0 / 1.4
    assert f"{bench.VARIANTS['modelopt']} / QAD = {sys.modules['repeats'].NO_CLAIM}." in report  # 1.5-1.7 meets 1.4-1.6


def test_no_peer_line_without_the_peer(bench):
    report = bench.report(rows(bench, {"bf16": [1.0] * 5, "qad": [1.5] * 5}), tokens_per_step=4096)
    assert "/ QAD =" not in report
