"""benchmarks/bench_audit_throughput.py runs end to end on a tiny setting and writes JSON + Markdown results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_audit_throughput.py"


def test_audit_throughput_benchmark_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--inputs", "random", "--thresholds", "0.3", "0.7",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "audit_throughput_cpu.json").read_text())
    assert report["environment"]["device_type"] == "cpu" and "RANDOM" in report["inputs"]
    assert [(r["batch_size"], r["threshold"]) for r in report["rows"]] == [(8, 0.3), (8, 0.7)]
    for r in report["rows"]:
        assert r["images"] == 16 and r["full_images_per_s"] > 0 and r["skip_images_per_s"] > 0
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["flops_fraction_executed"])
    md = (tmp_path / "audit_throughput_cpu.md").read_text()
    assert "| batch | threshold |" in md and "efficiency" in md and "wrote" in proc.stdout


def test_audit_throughput_benchmark_includes_the_card_default_threshold(tmp_path):
    from skipviz import CIFAR_MODEL, create_model

    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--inputs", "random", "--policy", "plan",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and "no plan head" in proc.stderr:
        pytest.skip("the default model's weights (with a plan head) are not in data/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "audit_throughput_plan_cpu.json").read_text())
    card = create_model(CIFAR_MODEL).meta.default_threshold("plan")
    assert report["card_default_threshold"] == card
    assert [r["threshold"] for r in report["rows"]] == sorted({0.1, 0.5, 0.7, card})
    assert f"{card:.2f} (card default)" in (tmp_path / "audit_throughput_plan_cpu.md").read_text()
