"""benchmarks/bench_memory_format.py runs end to end on a tiny setting and writes JSON + Markdown results."""
from __future__ import annotations

from conftest import run_quick_benchmark


def test_memory_format_benchmark_runs_end_to_end(tmp_path):
    proc, report, md = run_quick_benchmark("bench_memory_format.py", tmp_path, "memory_format_cpu")
    assert report["environment"]["device_type"] == "cpu" and "RANDOM" in report["inputs"]
    assert [r["batch_size"] for r in report["rows"]] == [1, 4]
    for r in report["rows"]:
        for key in ("nchw_full_ms", "channels_last_full_ms", "nchw_skipped_ms", "channels_last_skipped_ms"):
            assert r[key] > 0
        assert r["full_channels_last_speedup"] == r["nchw_full_ms"] / r["channels_last_full_ms"]
    assert "| batch | full NCHW ms |" in md and "wrote" in proc.stdout
