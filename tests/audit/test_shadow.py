"""The audit's shadow run: sampled by SHA-256, full-network outputs kept and reused, reproduction of both."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skipviz import GatePolicy
from skipviz.audit import ShadowPlan, AuditStore, reproduce_many, run_audit
from skipviz.audit.report import summarize, write_report
from skipviz.audit.shadow import full_output_key, shadow_words
from skipviz.cli import main


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(12):
        (root / f"{i:02d}.png").write_bytes(_png(i))
    return root


def test_a_plan_parses_and_samples_by_hash_deterministically():
    assert ShadowPlan.parse("all") == ShadowPlan(1.0) and ShadowPlan.parse("10%").fraction == pytest.approx(0.1)
    assert ShadowPlan.parse("0.25", reuse=False) == ShadowPlan(0.25, False)
    for bad in ("0", "1.5", "-0.1", "some", "150%"):
        with pytest.raises(ValueError):
            ShadowPlan.parse(bad)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    plan = ShadowPlan(0.25)
    picked = [plan.checks(s) for s in shas]
    assert picked == [ShadowPlan(0.25).checks(s) for s in shas]  # the same inputs every time
    assert 0.22 < np.mean(picked) < 0.28
    # a larger fraction checks a superset: resuming or widening a sample keeps the inputs already checked
    assert all(ShadowPlan(0.5).checks(s) for s, p in zip(shas, picked) if p)
    assert all(ShadowPlan(1.0).checks(s) for s in shas) and ShadowPlan(0.01).checks(None)


def test_a_second_audit_of_the_same_bytes_reuses_the_full_outputs_and_reproduces(tiny_net, images, tmp_path):
    db = tmp_path / "a.sqlite"
    first = run_audit([images], tiny_net, GatePolicy(0.5), db, batch_size=5, latency_rounds=0)
    assert {r.shadow for r in first.ok_records} == {"run"} and first.timings["shadow_run"] == 12
    second = run_audit([images], tiny_net, GatePolicy(0.3), db, batch_size=4, latency_rounds=0)
    assert {r.shadow for r in second.ok_records} == {"reused"}
    assert second.timings["shadow_run"] == 0 and second.timings["full_s"] < first.timings["full_s"]
    by_name = {r.input_name: r for r in first.ok_records}
    for r in second.ok_records:
        origin = by_name[r.input_name]
        assert r.shadow_from == origin.record_id
        assert r.full_logits == origin.full_logits and r.full_predicted_index == origin.full_predicted_index
        assert r.agree == (r.predicted_index == r.full_predicted_index)
    s = summarize(second)
    assert s["shadow"]["reused"] == 12 and s["agreement"]["n"] == 12 and "kept from an earlier audit" in \
        shadow_words(s["shadow"])
    results = reproduce_many(db, [r.record_id for r in second.ok_records], net=tiny_net)
    assert all(x.reproduced for x in results), [x.message for x in results]
    assert "reused from record" in results[0].message
    # another model's parameters, another device or other bytes never hit the kept outputs
    with AuditStore(db) as st:
        sha = first.ok_records[0].input_sha256
        key = full_output_key(first.model_name, first.params_sha256, _prep(tiny_net), "cpu", sha)
        assert key in st.full_outputs([key])
        assert not st.full_outputs([full_output_key(first.model_name, "0" * 64, _prep(tiny_net), "cpu", sha),
                                    full_output_key(first.model_name, first.params_sha256, _prep(tiny_net),
                                                    "cuda:0", sha)])


def _prep(net) -> str:
    from skipviz.audit.shadow import preprocessing_fingerprint

    return preprocessing_fingerprint(net)


def test_a_damaged_kept_output_is_not_reused(tiny_net, images, tmp_path):
    import sqlite3

    db = tmp_path / "a.sqlite"
    run_audit([images], tiny_net, GatePolicy(0.5), db, batch_size=6, latency_rounds=0)
    con = sqlite3.connect(db)
    keys = [k for (k,) in con.execute("SELECT key FROM full_outputs ORDER BY record_id")]
    con.execute("UPDATE full_outputs SET logits = ? WHERE key = ?", (b"\x00" * 7, keys[0]))  # not float32s
    con.execute("UPDATE full_outputs SET logits = ? WHERE key = ?", (b"\x00" * 8, keys[1]))  # 2 values, not 10
    con.commit()
    con.close()
    again = run_audit([images], tiny_net, GatePolicy(0.3), db, batch_size=6, latency_rounds=0)
    shadows = sorted(r.shadow for r in again.ok_records)
    assert shadows == ["reused"] * 10 + ["run"] * 2  # the two damaged ones run the full network again


def test_no_reuse_runs_the_full_network_again(tiny_net, images, tmp_path):
    db = tmp_path / "a.sqlite"
    run_audit([images], tiny_net, GatePolicy(0.5), db, batch_size=6, latency_rounds=0)
    again = run_audit([images], tiny_net, GatePolicy(0.5), db, batch_size=6, latency_rounds=0,
                      shadow=ShadowPlan(1.0, reuse=False))
    assert {r.shadow for r in again.ok_records} == {"run"} and again.timings["shadow_run"] == 12


def test_a_sampled_shadow_run_checks_only_its_share_and_says_so(tiny_net, images, tmp_path):
    db = tmp_path / "a.sqlite"
    plan = ShadowPlan(0.5, reuse=False)
    run = run_audit([images], tiny_net, GatePolicy(0.5), db, batch_size=5, latency_rounds=0, shadow=plan)
    checked = [r for r in run.ok_records if plan.checks(r.input_sha256)]
    assert 0 < len(checked) < 12
    for r in run.ok_records:
        if plan.checks(r.input_sha256):
            assert r.shadow == "run" and r.agree is not None and r.full_logits is not None
        else:
            assert r.shadow == "not checked" and r.agree is None and r.full_logits is None
            assert r.kl_full_skipped is None and r.full_latency_ms is None and r.trace is not None
    assert run.timings["shadow_run"] == len(checked) and run.timings["shadow_not_checked"] == 12 - len(checked)
    s = summarize(run)
    assert s["agreement"]["n"] == len(checked) and s["shadow"]["not_checked"] == 12 - len(checked)
    assert run.config["shadow"] == {"fraction": 0.5, "reuse": False}
    # every record reproduces: the full network is replayed on the rows it ran on, as one batch
    results = reproduce_many(db, [r.record_id for r in run.ok_records], net=tiny_net)
    assert all(x.reproduced for x in results), [x.message for x in results]
    assert any("not checked against the full network" in x.message for x in results)
    paths = write_report(run, tmp_path / "report.html")
    html = Path(paths[0]).read_text()
    assert f"{12 - len(checked)} not checked" in html
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["summary"]["shadow"]["not_checked"] == 12 - len(checked)


def test_the_cli_takes_a_shadow_fraction_and_refuses_a_bad_one(images, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["audit", str(images), "--model", "cifar_resnet20", "--out", str(out), "--quiet",
                 "--shadow", "50%", "--latency-rounds", "0", "--reproduce", "2"]) == 0
    text = capsys.readouterr().out
    assert "not checked" in text
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["shadow"]["plan"] == {"fraction": 0.5, "reuse": True}
    with pytest.raises(SystemExit):
        main(["audit", str(images), "--out", str(out), "--shadow", "most"])
    assert "shadow: expected 'all'" in capsys.readouterr().err


def test_a_report_with_no_input_checked_still_renders_and_says_so(tiny_net, tmp_path):
    # unlabelled inputs none of which falls in a tiny checked share: every per-class row takes the skipped run's
    # prediction, the FLOPs figure draws them as not checked, the full network's rate is not inflated
    from skipviz.audit.report import skip_rate_per_class
    from skipviz.figures_audit import fig_flops_saved

    root = tmp_path / "few"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.png").write_bytes(_png(100 + i))
    plan = ShadowPlan(1e-6, reuse=False)
    run = run_audit([root], tiny_net, GatePolicy(0.5), tmp_path / "a.sqlite", batch_size=4, latency_rounds=0,
                    shadow=plan)
    assert all(r.agree is None for r in run.ok_records) and len(run.ok_records) == 6
    summary, by_block = skip_rate_per_class(run.records)
    assert summary["n"].sum() == 6 and not by_block.empty
    names = {t.name for t in fig_flops_saved(run.records).data}
    assert names == {"not checked against full"}
    assert run.throughput()["full_images_per_s"] is None and run.timings["shadow_run"] == 0
    html = Path(write_report(run, tmp_path / "r.html")[0]).read_text()
    assert "6 not checked" in html


def test_exited_inputs_get_their_full_output_resumed_from_the_exit_and_reproduce_bit_for_bit(tiny_net, images,
                                                                                              tmp_path):
    import torch

    from skipviz import EarlyExitPolicy

    db = tmp_path / "e.sqlite"
    net = tiny_net.eval()
    names = sorted(p.name for p in images.iterdir())
    x = net.meta.preprocess([Image.open(images / n) for n in names])
    with torch.no_grad():
        feats = net.forward_intermediates(x, intermediates_only=True)
        conf = torch.softmax(net.probe(3)(feats[3]), 1).amax(1)
    policy = EarlyExitPolicy(1.0, {3: float(conf.median())}, min_block=99)  # about half leave after block 3
    run = run_audit([images], net, policy, db, batch_size=6, latency_rounds=0, shadow=ShadowPlan(reuse=False))
    exits = [r.trace.get("exit_block") for r in run.ok_records]
    assert any(e is not None for e in exits) and any(e is None for e in exits)
    assert run.config["shadow_resumed"] and {r.shadow for r in run.ok_records} == {"run"}
    with torch.no_grad():
        full = net(net.meta.preprocess([Image.open(r.input_path) for r in run.ok_records]))
    got = torch.tensor([r.full_logits for r in run.ok_records])
    torch.testing.assert_close(got, full.float(), rtol=1e-4, atol=1e-5)  # the full network's outputs
    results = reproduce_many(db, [r.record_id for r in run.ok_records], net=net)
    assert all(x.reproduced and "bit-for-bit" in x.message for x in results), [x.message for x in results]


def test_a_run_begun_without_resumed_full_outputs_keeps_running_the_full_network_from_the_image(tiny_net, images,
                                                                                                 tmp_path,
                                                                                                 monkeypatch):
    import sqlite3

    import skipviz.audit._batches as batches

    from skipviz import EarlyExitPolicy

    db = tmp_path / "old.sqlite"
    net = tiny_net.eval()
    policy = EarlyExitPolicy(0.12, min_block=3)

    def stop_after_one_batch(fraction: float, text: str) -> None:
        if text.startswith("4/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_audit([images], net, policy, db, batch_size=4, latency_rounds=0, shadow=ShadowPlan(reuse=False),
                  progress=stop_after_one_batch)
    con = sqlite3.connect(db)  # as an older SkipViz left it: no shadow_resumed in the run's configuration
    (cfg_json,) = con.execute("SELECT config_json FROM runs").fetchone()
    cfg = json.loads(cfg_json)
    assert cfg.pop("shadow_resumed") is True
    con.execute("UPDATE runs SET config_json = ?", (json.dumps(cfg),))
    con.commit()
    con.close()

    def not_resumed(*args, **kwargs):
        raise AssertionError("a run begun without resumed full outputs must not resume them")

    monkeypatch.setattr(batches, "full_logits", not_resumed)
    run = run_audit([images], net, policy, db, batch_size=4, latency_rounds=0, shadow=ShadowPlan(reuse=False),
                    resume=True)
    assert run.resumed == 4 and len(run.ok_records) == 12 and run.config["shadow_resumed"] is False
    later = [r for r in run.ok_records if r.batch_index > 0]
    results = reproduce_many(db, [r.record_id for r in later], net=net)
    assert all(x.reproduced and "bit-for-bit" in x.message for x in results), [x.message for x in results]
