"""benchmarks/bench_latency.py runs end to end on a tiny setting and writes JSON + Markdown results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_latency.py"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_benchmark_runs_end_to_end_on_a_tiny_setting(tmp_path):
    proc = _run("--quick", "--inputs", "random", "--device", "cpu", "--batch-sizes", "1,2",
                "--thresholds", "0.3,0.5,0.7", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "latency_cpu.json").read_text())
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["torch_version"] and env["torchvision_version"] and env["date"]
    assert report["settings"]["batch_sizes"] == [1, 2] and report["settings"]["thresholds"] == [0.3, 0.5, 0.7]
    assert "RANDOM" in report["inputs"] and report["model"]
    rows = report["rows"]
    assert [(r["batch_size"], r["threshold"]) for r in rows] == [(b, t) for b in (1, 2) for t in (0.3, 0.5, 0.7)]
    for r in rows:
        assert r["full_ms"] > 0 and r["skipped_ms"] > 0 and r["masked_ms"] > 0 and r["predicted_ms"] > 0
        assert 0 <= r["flops_saved_fraction"] < 1 and r["max_abs_logit_diff_masked"] < 1e-3
        if r["flops_saved_fraction"] > 0:
            assert abs(r["efficiency"] - r["time_saved_fraction"] / r["flops_saved_fraction"]) < 1e-9
            assert r["decision_free_efficiency"] == r["decision_free_time_saved_fraction"] / r["flops_saved_fraction"]
        assert 0 <= r["decision_free_time_saved_fraction"] < 1
    assert [g["batch_size"] for g in report["gate_cost"]] == [1, 2]
    assert all(g["flops_fraction"] <= 0.02 for g in report["gate_cost"])
    md = (tmp_path / "latency_cpu.md").read_text()
    assert "| batch | threshold |" in md and "efficiency" in md and env["device_name"] in md
    assert "ceiling: free decisions" in md and "paired efficiency (IQR)" in md
    assert all(r["paired_efficiency"] is None or len(r["paired_efficiency_quartiles"]) == 2 for r in rows)
    assert env["allocator"] and f"CPU allocator: {env['allocator']}" in md  # what the script set (keep_heap_memory)
    assert "wrote" in proc.stdout


def test_an_explicit_thread_count_is_written_beside_the_default(tmp_path):
    proc = _run("--quick", "--inputs", "random", "--device", "cpu", "--batch-sizes", "1", "--thresholds", "0.5",
                "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "latency_cpu_1thread.json").read_text())
    assert report["environment"]["threads"] == 1 and not (tmp_path / "latency_cpu.json").exists()


def test_benchmark_rejects_bad_settings_with_a_message(tmp_path):
    proc = _run("--quick", "--inputs", "random", "--thresholds", "0.5,1.5", "--out", str(tmp_path))
    assert proc.returncode == 2 and "thresholds" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("--batch-sizes", "one", "--out", str(tmp_path))
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr
    assert not (tmp_path / "latency_cpu.json").exists()


def test_an_imagenet_model_is_timed_on_held_out_photos_where_they_are_here():
    import pytest

    from skipviz import create_model
    from skipviz.cli.bench import BenchConfig, bench_inputs
    from skipviz.data import imagenette_root

    net = create_model("efficientnet_lite0.imagenet_gated")
    x, what = bench_inputs(net, BenchConfig(inputs="random"), 2)
    assert x.shape == (2, 3, 224, 224) and "RANDOM" in what
    if imagenette_root() is None:
        pytest.skip("Imagenette is not on this machine (../shared/datasets/imagenette, or set SKIPVIZ_IMAGENETTE)")
    x, what = bench_inputs(net, BenchConfig(), 3)  # early exits never fire on noise: real photos by default
    assert x.shape == (3, 3, 224, 224) and "Imagenette val photos" in what


def test_the_report_of_early_exits_leaves_out_the_gate_heads_they_do_not_use():
    from skipviz.cli.bench import results_markdown

    report = json.loads((ROOT / "benchmarks" / "results" / "latency_early_exit_cpu_2thread.json").read_text())
    text = results_markdown(report)
    assert "exit probes' own time is inside the skipped run" in text and "Decision heads (gate heads" not in text
    report["settings"]["policy"] = "gates"
    assert "Decision heads (gate heads" in results_markdown(report)
