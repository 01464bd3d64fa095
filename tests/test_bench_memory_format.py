"""benchmarks/bench_memory_format.py runs end to end on a tiny setting and writes JSON + Markdown results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_memory_format.py"


def test_memory_format_benchmark_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--inputs", "random", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "memory_format_cpu.json").read_text())
    assert report["environment"]["device_type"] == "cpu" and "RANDOM" in report["inputs"]
    assert [r["batch_size"] for r in report["rows"]] == [1, 4]
    for r in report["rows"]:
        for key in ("nchw_full_ms", "channels_last_full_ms", "nchw_skipped_ms", "channels_last_skipped_ms"):
            assert r[key] > 0
        assert r["full_channels_last_speedup"] == r["nchw_full_ms"] / r["channels_last_full_ms"]
    md = (tmp_path / "memory_format_cpu.md").read_text()
    assert "| batch | full NCHW ms |" in md and "wrote" in proc.stdout
