"""skipviz.dashboard_tables: key columns first, every column shown with a label (fractions as percents), the Audit
page's summary from the report's own numbers (Wilson intervals), percents never "-0.0", policies in words."""
from __future__ import annotations

import numpy as np
import pytest

from skipviz import dashboard, load_image, policies
from skipviz.audit import AuditRecord, AuditRun
from skipviz.audit.report import proportion, report_data
from skipviz.dashboard_tables import (AUDIT_FIRST, AUDIT_LAST, audit_columns, audit_disagreements, audit_records,
                                      audit_summary, block_columns, block_table, latency_metric, policy_words,
                                      top5_columns, top5_side_by_side)
from skipviz.samples import sample_bytes, sample_names


def audit_record(i: int, pred: str, full: str, label: str | None = None, status: str = "ok") -> AuditRecord:
    """A stored audit record of three blocks (the first two run)."""
    ok = status == "ok"
    blocks = [{"index": j, "name": f"b{j}", "downsample": j == 1, "executed": j < 2, "score": 0.7, "threshold": 0.5,
               "reason": "gate", "flops": 100 if j < 2 else 0} for j in range(3)]
    return AuditRecord(
        run_id="r1", input_name=f"{i}.png", input_path=None, status=status, model_name="m", weights_sha256="w" * 64,
        params_sha256="p" * 64, policy={"name": "plan", "threshold": 0.25}, device="cpu", versions={},
        timestamp="2026-01-01T00:00:00+00:00", input_sha256=f"{i:064x}", label=label,
        error=None if ok else "not a recognised image format", trace={"blocks": blocks, "logits": [0.0, 1.0]}
        if ok else None, predicted_label=pred if ok else None, confidence=0.8 if ok else None,
        full_predicted_label=full if ok else None, full_confidence=0.9 if ok else None,
        agree=(pred == full) if ok else None, kl_full_skipped=0.0 if pred == full else 0.5,
        flops_executed=250 if ok else None, flops_full=350 if ok else None, blocks_executed=2 if ok else None,
        blocks_total=3 if ok else None, latency_ms=1.0 if ok else None, full_latency_ms=2.0 if ok else None,
        batch_index=0, batch_pos=i, record_id=i + 1)


def audit_run(latency: dict | None = None) -> AuditRun:
    """Six audited inputs (one disagreement, four labelled) and one that failed."""
    records = [audit_record(0, "cat", "cat", "cat"), audit_record(1, "dog", "cat", "cat"),
               audit_record(2, "dog", "dog", "dog"), audit_record(3, "cat", "cat", "dog"),
               audit_record(4, "cat", "cat"), audit_record(5, "dog", "dog"),
               audit_record(6, "", "", status="failed")]
    return AuditRun(run_id="r1", db_path="x.sqlite", model_name="m", weights_sha256="w" * 64, params_sha256="p" * 64,
                    policy={"name": "plan", "threshold": 0.25}, config={}, environment={}, records=records,
                    timings={"skip_s": 1.0, "full_s": 3.0, "images": 6}, latency=latency)


@pytest.fixture(scope="module")
def trace(tiny_net):
    image, _ = load_image(sample_bytes(sample_names()[0]))
    return dashboard.inspect(tiny_net, dashboard.preprocess(tiny_net, image), policies.make_policy(tiny_net, 0.5))


def test_the_block_table_opens_with_decision_reason_flops_and_time(trace):
    ms = [0.1 * (i + 1) for i in range(len(trace.trace.blocks))]
    table = block_table(trace.trace, ms, "CPU (1 thread)", 16)
    time_col = dashboard.profile_column("CPU (1 thread)", 16)
    assert list(table.columns) == ["block", "name", "decision", "reason", "MFLOPs", time_col, "gate probability",
                                   "threshold", "downsampling"]
    assert list(table[time_col]) == pytest.approx(ms)
    columns = block_columns(trace.trace.policy, time_col)
    assert set(columns) == set(table.columns)  # every column has a short label and a width
    assert columns[time_col].label == "ms (est.)" and "CPU (1 thread)" in columns[time_col].help
    assert columns["reason"].width >= 200 and all(c.label and c.width for c in columns.values())
    assert "ms (est.)" not in [c.label for c in block_columns(trace.trace.policy).values()]


def test_top5_probabilities_as_percent_bars(trace, tiny_net):
    top = top5_side_by_side(trace, tiny_net.meta.classes)
    columns = top5_columns()
    assert set(columns) == set(top.columns)
    assert columns["full: probability"].kind == columns["skipped: probability"].kind == "progress"
    assert sum(c.width for c in columns.values()) <= 520  # two thirds of a 1280 px page


def test_percents_never_say_minus_zero():
    assert dashboard.percent(-0.0004) == "0.0%" and dashboard.percent(-0.0) == "0.0%"
    assert dashboard.percent(0.1234) == "12.3%" and dashboard.percent(-0.012) == "-1.2%"
    assert dashboard.percent_points(-0.0004) == "+0.0 pts" and dashboard.percent_points(-0.05) == "-5.0 pts"


def test_a_latency_headline_never_states_a_saving_its_interval_does_not_support():
    from skipviz.measure.saving import paired_saving

    rng = np.random.default_rng(0)
    full = 2e-3 + rng.normal(0, 1e-5, 15)
    clear = latency_metric(paired_saving(full, full - 5e-4), "Latency saved", "on CPU")
    assert clear.value == "0.50 ms saved" and clear.detail.startswith("95 % CI") and clear.help == "on CPU"
    rng = np.random.default_rng(1)
    noise = paired_saving(2e-3 + rng.normal(0, 8e-4, 15), 2e-3 + rng.normal(0, 8e-4, 15))
    assert not noise.measurable
    shown = latency_metric(noise, "Latency saved")
    assert shown.value == "none measurable" and shown.detail.startswith("±") and "contains 0" in shown.detail


def test_audit_records_open_with_status_and_prediction_and_end_with_identifiers():
    frame = audit_records(audit_run().dataframe())
    cols = list(frame.columns)
    assert cols[:3] == ["status", "input_name", "predicted"] and cols[-4:] == list(AUDIT_LAST)
    assert set(AUDIT_FIRST) <= set(cols) and len(cols) == len(set(cols)) == len(audit_run().dataframe().columns)
    assert frame["input_name"].iloc[0] == "1.png"  # the disagreement first
    labels = audit_columns()
    assert labels["confidence"].kind == labels["flops_saved_fraction"].kind == "percent"
    assert "nats" in labels["kl_full_skipped"].label
    dis = audit_disagreements(frame)
    assert list(dis["input_name"]) == ["1.png"] and list(dis.columns)[:3] == ["input_name", "label", "predicted"]
    assert audit_disagreements(frame[frame["agree"].ne(False)]).empty


def test_the_audit_summary_uses_the_reports_numbers():
    latency = {"saving_ms": 0.25, "ci_low_ms": 0.2, "ci_high_ms": 0.3, "measurable": True, "rounds": 15,
               "sample_size": 6, "device": "cpu", "label": "0.25 ms saved (95 % CI 0.20-0.30 ms) per image"}
    summary = report_data(audit_run(latency))["summary"]
    metrics = {m.label: m for m in audit_summary(summary)}
    assert list(metrics) == ["Accuracy", "Agreement with full", "FLOPs saved", "Time saved", "Failures"]
    agree, acc = proportion(5, 6), proportion(2, 4)  # the report module's Wilson intervals
    assert metrics["Agreement with full"].value == dashboard.percent(agree["rate"])
    assert metrics["Agreement with full"].detail == \
        f"CI {dashboard.percent(agree['ci_low'])[:-1]}-{dashboard.percent(agree['ci_high'])}"
    assert metrics["Accuracy"].value == dashboard.percent(acc["rate"]) == "50.0%"
    assert metrics["Accuracy"].detail.startswith(f"CI {dashboard.percent(acc['ci_low'])[:-1]}-")
    assert "full network" in metrics["Accuracy"].help
    assert metrics["FLOPs saved"].value == dashboard.percent(1 - 250 / 350)
    assert metrics["Time saved"].value == "0.25 ms" and metrics["Time saved"].detail.startswith("saved, CI 0.20-0.30")
    assert metrics["Failures"].value == "1" and metrics["Failures"].detail == "of 7 inputs"
    noisy = dict(latency, measurable=False, ci_low_ms=-0.1, ci_high_ms=0.3)
    time_saved = audit_summary(report_data(audit_run(noisy))["summary"])[3]
    assert time_saved.value == "none measurable" and "ms" not in time_saved.value
    assert time_saved.detail == "±0.20 ms per image"  # the interval's half-width, -0.1 to 0.3 ms
    unlabelled = audit_summary(report_data(audit_run(None))["summary"])
    assert unlabelled[3].value == "not measured"


def test_policies_in_words_from_what_tables_store():
    assert policy_words({"name": "gates", "threshold": 0.3, "overrides": {"2": "skip"}}) == \
        "gates, threshold 0.30, 1 override"
    assert policy_words("{'name': 'plan', 'overrides': {}, 'threshold': 0.25}") == "plan, threshold 0.25"
    assert policy_words('{"name": "plan", "threshold": 0.5}') == "plan, threshold 0.50"
    assert policy_words("not a policy") == "not a policy" and policy_words(None) == ""


def test_the_redundancy_tables_show_percents_and_nats():
    from skipviz.evaluate.calibration import CalibrationPoint, compare_points

    point = CalibrationPoint({}, 0.75, 0.875, 1.0, 0.8, np.zeros(2), np.ones((2, 3), dtype=bool))
    frame = compare_points({"full": point})
    columns = dashboard.compare_columns()
    assert set(frame.columns) <= set(columns)
    assert {c for c, v in columns.items() if v.kind == "percent"} == {"accuracy", "agreement with full", "FLOPs cut"}
    assert "nats" in dashboard.kl_policy_columns()["kl"].label

