"""Audit reports: numbers, tables, figures, and the self-contained HTML/JSON/CSV."""
from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from PIL import Image

from skipviz import GatePolicy
from skipviz.audit import AuditRecord, AuditRun, ReproResult, reproduce_sample, run_audit
from skipviz.figures import (fig_agreement, fig_flops_saved, fig_skip_rate_per_block, fig_skip_rate_per_class,
                             fig_throughput)
from skipviz.audit.report import (plotly_script_name, proportion, render_report, skip_rate_per_block, skip_rate_per_class, summarize,
                                  write_report)


def _rec(i: int, executed: list[bool], label: str | None, pred: str, full: str, status: str = "ok",
         name: str | None = None) -> AuditRecord:
    blocks = [{"index": j, "name": f"b{j}", "downsample": j == 1, "executed": e, "score": 0.7 if e else 0.2,
               "threshold": 0.5, "reason": "gate", "flops": 100 if e else 0} for j, e in enumerate(executed)]
    ok = status == "ok"
    return AuditRecord(
        run_id="r", input_name=name or f"{i}.png", input_path=None, status=status, model_name="m",
        weights_sha256="w" * 64, params_sha256="p" * 64, policy={"name": "gates", "threshold": 0.5}, device="cpu",
        versions={}, timestamp="2026-01-01T00:00:00+00:00", input_sha256=f"{i:064x}", label=label,
        error=None if ok else "not a recognised image format",
        trace={"blocks": blocks, "logits": [0.0, 1.0]} if ok else None,
        predicted_label=pred if ok else None, confidence=0.8 if ok else None,
        full_predicted_label=full if ok else None, full_confidence=0.9 if ok else None,
        agree=(pred == full) if ok else None, kl_full_skipped=0.0 if pred == full else 0.5,
        flops_executed=50 + 100 * sum(executed) if ok else None, flops_full=350 if ok else None,
        blocks_executed=sum(executed) if ok else None, blocks_total=len(executed) if ok else None,
        latency_ms=1.0 if ok else None, full_latency_ms=2.0 if ok else None, batch_index=0, batch_pos=i,
        thumbnail_png_b64="iVBORw0KGgo=" if ok else None, record_id=i + 1)


def _run(records: list[AuditRecord]) -> AuditRun:
    return AuditRun(run_id="r", db_path="x.sqlite", model_name="m", weights_sha256="w" * 64,
                    params_sha256="p" * 64, policy={"name": "gates", "threshold": 0.5}, config={"batch_size": 4},
                    environment={"torch": "2", "device": "cpu"}, records=records,
                    timings={"skip_s": 1.0, "full_s": 3.0, "images": 6})


@pytest.fixture()
def run() -> AuditRun:
    return _run([
        _rec(0, [True, True, True], "cat", "cat", "cat"),
        _rec(1, [False, True, True], "cat", "dog", "cat", name="<script>alert(1)</script>.png"),
        _rec(2, [False, True, False], "dog", "dog", "dog"),
        _rec(3, [True, True, False], "dog", "dog", "cat"),
        _rec(4, [True, True, True], None, "cat", "cat"),
        _rec(5, [False, False, True], None, "dog", "dog"),
        _rec(6, [], "cat", "", "", status="failed", name="broken.png"),
    ])


def test_wilson_interval_matches_the_formula():
    p = proportion(8, 10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert p["rate"] == 0.8 and p["ci_low"] == pytest.approx(centre - half) and p["ci_high"] == pytest.approx(
        centre + half)
    assert proportion(0, 0)["rate"] is None and proportion(5, 5)["ci_high"] == pytest.approx(1.0)


def test_summary_numbers(run):
    s = summarize(run)
    assert (s["n_inputs"], s["n_ok"], s["n_failed"]) == (7, 6, 1)
    assert (s["agreement"]["k"], s["agreement"]["n"]) == (4, 6)
    assert (s["accuracy_skipped"]["k"], s["accuracy_skipped"]["n"]) == (3, 4)  # 4 labelled; #1 is wrong
    assert (s["accuracy_full"]["k"], s["accuracy_full"]["n"]) == (3, 4)  # #3's full prediction is wrong
    executed = [3, 2, 1, 2, 3, 1]
    assert s["flops_executed_mean"] == pytest.approx(np.mean([50 + 100 * e for e in executed]))
    assert s["flops_saved_fraction"] == pytest.approx(1 - s["flops_executed_mean"] / 350)
    # no latency is derived from per-record batch timings: only a paired measurement reports one
    assert "latency_saved_fraction" not in s and s["latency"] is None
    assert s["throughput"]["skip_images_per_s"] == 6.0 and s["throughput"]["skip_with_shadow_images_per_s"] == 1.5
    assert s["kl_full_skipped_max"] == 0.5


def test_skip_rate_tables(run):
    per_block = skip_rate_per_block(run.records)
    assert list(per_block["name"]) == ["b0", "b1", "b2"]
    assert list(per_block["skip_rate"]) == pytest.approx([3 / 6, 1 / 6, 2 / 6])
    assert list(per_block["n"]) == [6, 6, 6]
    summary, by_block = skip_rate_per_class(run.records)
    s = summary.set_index("class")
    assert s.loc["cat", "n"] == 3 and s.loc["cat", "n_labelled"] == 2  # + one the full network calls a cat
    assert s.loc["dog", "accuracy"] == 1.0 and s.loc["dog", "agreement"] == pytest.approx(2 / 3)
    assert list(by_block.columns) == ["b0", "b1", "b2"]
    assert by_block.loc["dog", "b0"] == pytest.approx(2 / 3)


def test_figures_are_plain_plotly(run):
    per_block = skip_rate_per_block(run.records)
    _, by_block = skip_rate_per_class(run.records)
    s = summarize(run)
    figs = [fig_skip_rate_per_block(per_block), fig_skip_rate_per_class(by_block), fig_flops_saved(run.records),
            fig_throughput(s["throughput"]), fig_agreement(s)]
    assert all(isinstance(f, go.Figure) for f in figs)
    assert list(figs[0].data[0].y) == pytest.approx(list(per_block["skip_rate"]))
    assert np.asarray(figs[1].data[0].z).shape == (2, 3)
    assert sum(len(t.x) for t in figs[2].data) == 6 and {t.name for t in figs[2].data} == {"agrees with full",
                                                                                           "disagrees"}
    assert list(figs[3].data[0].y) == [6.0, 1.5, 2.0]
    assert list(figs[4].data[0].y) == pytest.approx([4 / 6, 0.75, 0.75])


def test_render_report_self_contained_and_ordered(run):
    repro = [ReproResult(2, "1.png", True, True, True, True, True, 0.0, 0.0, 0.0, "cpu", "reproduced bit-for-bit")]
    page, text, csv = render_report(run, reproducibility=repro)
    # Plotly's script once, from the file beside the page (never a network address), not inlined per report
    sources = re.findall(r'<script[^>]+src="([^"]+)"', page)
    assert sources == [plotly_script_name()] and "://" not in sources[0]
    assert page.count("Plotly.newPlot") == 4 and len(page) < 200_000  # agreement, per block, per class, FLOPs
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert page.index("Disagreements with the full network (2)") < page.index("Failed inputs (1)")
    assert "not a recognised image format" in page and "1/1 sampled records reproduced" in page
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in page
    data = json.loads(text)
    assert data["summary"]["agreement"]["k"] == 4 and data["reproducibility"]["reproduced"] == 1
    assert [r["agree"] for r in data["records"][:2]] == [False, False]
    assert data["failed"] == [{"record_id": 7, "input_name": "broken.png", "input_sha256": f"{6:064x}",
                              "error": "not a recognised image format"}]  # failed rows keep the file's SHA-256
    assert "thumbnail_png_b64" not in data["records"][0]
    table = pd.read_csv(io.StringIO(csv))
    assert list(table["agree"][:2]) == [False, False] and table["status"].iloc[2] == "failed"
    assert list(table.loc[table["input_name"] == "0.png", "executed_mask"]) == ["RRR"]


def test_folder_with_corrupt_files_still_produces_a_report(tiny_net, tmp_path):
    root = tmp_path / "imgs"
    for c, cls in enumerate(("plane", "ship")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            rng = np.random.default_rng(10 * c + i)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "ship" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / "plane" / "text.png").write_text("hello")
    run = run_audit([root], tiny_net, GatePolicy(0.5), tmp_path / "a.sqlite", labels_from_folders=True,
                    batch_size=3)
    html_path, json_path, csv_path = write_report(run, tmp_path / "out" / "report.html",
                                                  reproducibility=reproduce_sample(run, tiny_net, k=2))
    page = html_path.read_text()
    assert "Failed inputs (2)" in page and "imgs/ship/bad.jpg" in page and "imgs/plane/text.png" in page
    data = json.loads(json_path.read_text())
    assert data["summary"]["n_ok"] == 4 and data["summary"]["accuracy_skipped"]["n"] == 4
    assert data["reproducibility"]["sampled"] == 2 and data["reproducibility"]["reproduced"] == 2
    assert data["configuration"]["params_sha256"] == run.params_sha256
    assert {r["name"] for r in data["skip_rate_per_block"]} == set(tiny_net.block_names)
    table = pd.read_csv(csv_path)
    assert len(table) == 6 and set(table.loc[table["status"] == "failed", "input_name"]) == {
        "imgs/ship/bad.jpg", "imgs/plane/text.png"}


def test_empty_run_renders():
    page, text, csv = render_report(_run([_rec(0, [], None, "", "", status="failed")]))
    assert "Failed inputs (1)" in page and json.loads(text)["summary"]["agreement"]["rate"] is None


def test_html_row_cap_keeps_disagreements(run):
    page, _, csv = render_report(run, max_rows=3)
    assert page.count('class="bad"') == 4  # both disagreements, in their section and in the capped list
    assert "3 more agreeing inputs are in the CSV and JSON files" in page
    assert len(pd.read_csv(io.StringIO(csv))) == 7


def test_csv_cells_cannot_run_as_spreadsheet_formulas():
    records = [_rec(0, [True], "cat", "cat", "cat", name="=HYPERLINK(\"http://x\")"),
               _rec(1, [True], "cat", "cat", "cat", name="-2+3.png"), _rec(2, [True], "cat", "cat", "cat")]
    _, _, csv = render_report(_run(records))
    names = list(pd.read_csv(io.StringIO(csv))["input_name"])
    assert names == ["'=HYPERLINK(\"http://x\")", "'-2+3.png", "2.png"]
