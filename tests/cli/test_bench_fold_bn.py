"""benchmarks/bench_fold_bn.py runs end to end on a tiny setting and writes JSON + Markdown results."""
from __future__ import annotations

from conftest import run_quick_benchmark


def test_fold_benchmark_runs_end_to_end(tmp_path):
    proc, report, md = run_quick_benchmark("bench_fold_bn.py", tmp_path, "fold_bn_cpu")
    assert report["environment"]["device_type"] == "cpu" and "RANDOM" in report["inputs"]
    assert [r["batch_size"] for r in report["rows"]] == [1, 4]
    assert [r["images_per_call"] for r in report["rows"]] == [2, 4]
    for r in report["rows"]:
        for key in ("modules_full_ms", "folded_full_ms", "modules_skipped_ms", "folded_skipped_ms"):
            assert r[key] > 0
        assert r["full_fold_speedup"] == r["modules_full_ms"] / r["folded_full_ms"]
        assert 0 < r["max_abs_logit_diff"] < 1e-3  # folding changes float rounding, nothing more
        assert 0.9 <= r["decision_agreement"] <= 1.0
    assert "| batch | full modules ms |" in md and "wrote" in proc.stdout
