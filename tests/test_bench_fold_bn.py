"""benchmarks/bench_fold_bn.py runs end to end on a tiny setting and writes JSON + Markdown results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_fold_bn.py"


def test_fold_benchmark_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--inputs", "random", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "fold_bn_cpu.json").read_text())
    assert report["environment"]["device_type"] == "cpu" and "RANDOM" in report["inputs"]
    assert [r["batch_size"] for r in report["rows"]] == [1, 4]
    assert [r["images_per_call"] for r in report["rows"]] == [2, 4]
    for r in report["rows"]:
        for key in ("modules_full_ms", "folded_full_ms", "modules_skipped_ms", "folded_skipped_ms"):
            assert r[key] > 0
        assert r["full_fold_speedup"] == r["modules_full_ms"] / r["folded_full_ms"]
        assert 0 < r["max_abs_logit_diff"] < 1e-3  # folding changes float rounding, nothing more
        assert 0.9 <= r["decision_agreement"] <= 1.0
    md = (tmp_path / "fold_bn_cpu.md").read_text()
    assert "| batch | full modules ms |" in md and "wrote" in proc.stdout
