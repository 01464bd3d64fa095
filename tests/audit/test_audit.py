"""Batch audits, records, reproduction and the ``skipviz audit`` command, on a tiny random network."""
from __future__ import annotations

import io
import json
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skipviz import GatePolicy, create_model
from skipviz.audit.archive import ArchiveError
from skipviz.audit.store import AuditStore
from skipviz.audit import (AuditRecord, audit_uploaded_files, load_run, params_sha256, reproduce, reproduce_many,
                           reproduce_sample, run_audit)
from skipviz.measure.runs import default_audit_batch_size, measure_throughput
from skipviz.cli import main


def _png(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """ImageFolder layout: 2 classes x 3 images (one non-square), plus a corrupt and an empty file."""
    root = tmp_path / "imgs"
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(_png(10 * c + i, (40, 30) if i == 2 else (32, 32)))
    (root / "cat" / "broken.png").write_bytes(_png(99)[:60])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    return root


def test_run_audit_records_everything(tiny_net, image_folder, tmp_path):
    policy = GatePolicy(0.5)
    calls = []
    run = run_audit([image_folder], tiny_net, policy, tmp_path / "a.sqlite", labels_from_folders=True,
                    batch_size=3, progress=lambda f, t: calls.append((f, t)))
    assert len(run.records) == 8 and len(run.ok_records) == 6
    assert calls[-1] == (1.0, "8/8 inputs")
    failed = {r.input_name: r.error for r in run.failed_records}
    assert set(failed) == {"imgs/cat/broken.png", "imgs/dog/empty.jpg"}
    assert "damaged or truncated" in failed["imgs/cat/broken.png"] and "empty" in failed["imgs/dog/empty.jpg"]
    x = torch.stack([tiny_net.meta.transforms()(Image.open(image_folder / "dog" / "2.png").convert("RGB"))])
    with torch.no_grad():
        full = tiny_net(x)[0]
    for r in run.ok_records:
        assert r.label == r.input_name.split("/")[1]
        assert len(r.input_sha256) == 64 and r.image["format"] == "PNG"
        assert len(r.trace["blocks"]) == tiny_net.num_blocks and r.policy == policy.config()
        assert r.agree == (r.predicted_index == r.full_predicted_index)
        assert r.kl_full_skipped >= 0 and (r.kl_full_skipped > 0) == (r.trace["logits"] != r.full_logits)
        assert r.flops_executed == r.trace["flops_executed"] and r.flops_full == tiny_net.flop_table().full
        assert r.latency_ms > 0 and r.full_latency_ms > 0 and r.device == "cpu"
        assert r.params_sha256 == params_sha256(tiny_net) and r.versions["torch"] == torch.__version__
        assert r.thumbnail_png_b64
    non_square = next(r for r in run.ok_records if r.input_name == "imgs/dog/2.png")
    assert non_square.image["width"] == 40 and non_square.full_logits == [float(v) for v in full]
    assert sum(r.executed_mask.count(False) for r in run.ok_records) > 0  # the tiny net's gates do skip
    tp = run.throughput()
    assert tp["images"] == 6 and tp["skip_with_shadow_images_per_s"] < tp["skip_images_per_s"]
    with AuditStore(tmp_path / "a.sqlite") as st:
        stored = st.query(run_id=run.run_id)
        assert [r.to_dict() for r in stored] == [r.to_dict() for r in run.records]
        assert st.runs().set_index("run_id").loc[run.run_id, "status"] == "finished"
    again = load_run(tmp_path / "a.sqlite", run.run_id)
    assert again.records == run.records and again.timings == run.timings and again.policy == run.policy


def test_reproduce_bit_for_bit_and_detects_changes(tiny_net, image_folder, tmp_path):
    db = tmp_path / "r.sqlite"
    run = run_audit([image_folder], tiny_net, GatePolicy(0.4), db, batch_size=4)
    ids = [r.record_id for r in run.ok_records]
    results = reproduce_many(db, ids, net=tiny_net)
    assert [r.record_id for r in results] == ids
    assert all(r.reproduced and r.logits_match and r.max_abs_logit_diff == 0.0 for r in results), results
    assert results[0].tolerance == 0.0 and "bit-for-bit" in results[0].message
    failed = reproduce(db, run.failed_records[0].record_id, net=tiny_net)
    assert not failed.reproduced and "failed input" in failed.message

    # a stored logit changed by one ulp is caught
    target = run.ok_records[1]
    con = sqlite3.connect(db)
    data = json.loads(con.execute("SELECT record_json FROM records WHERE record_id = ?",
                                  (target.record_id,)).fetchone()[0])
    data["trace"]["logits"][0] = float(np.nextafter(np.float32(data["trace"]["logits"][0]), np.float32(np.inf)))
    con.execute("UPDATE records SET record_json = ? WHERE record_id = ?", (json.dumps(data), target.record_id))
    con.commit()
    con.close()
    bad = reproduce(db, target.record_id, net=tiny_net)
    assert not bad.reproduced and not bad.logits_match and bad.decisions_match and 0 < bad.max_abs_logit_diff < 1e-5

    # other weights, or an input file changed since the audit, are refused with the reason
    other = create_model("cifar_resnet20")
    other.load_state_dict(tiny_net.state_dict())
    with torch.no_grad():
        other.head.fc.bias.add_(1e-3)
    assert "weights differ" in reproduce(db, ids[0], net=other).message
    (image_folder / "cat" / "0.png").write_bytes(_png(1234))
    changed = reproduce(db, ids[0], net=tiny_net)
    assert not changed.reproduced and "input changed since the audit" in changed.message
    no_net = reproduce(db, ids[1])  # a random-init model cannot be rebuilt from the registry
    assert not no_net.reproduced and "randomly initialised" in no_net.message


def test_uploaded_files_and_reproduce_sample(tiny_net, tmp_path):
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("bird/5.png", _png(5))
        zf.writestr("bird/6.png", _png(6))
    files = [("cat/1.png", _png(1)), ("cat/2.png", _png(2)), ("bad.png", b"GIF89a nope"),
             ("more.zip", zipped.getvalue())]
    run = audit_uploaded_files(files, tiny_net, GatePolicy(0.5), tmp_path / "u.sqlite", labels_from_folders=True,
                               batch_size=2)
    assert [(r.input_name, r.label, r.status) for r in run.records] == [
        ("cat/1.png", "cat", "ok"), ("cat/2.png", "cat", "ok"), ("bad.png", None, "failed"),
        ("more.zip/bird/5.png", "bird", "ok"), ("more.zip/bird/6.png", "bird", "ok")]
    assert len(run.sources) == 5 and all(r.input_path is None for r in run.records)
    results = reproduce_sample(run, tiny_net, k=3)
    assert len(results) == 3 and all(r.reproduced for r in results)
    gone = reproduce(run.db_path, run.ok_records[0].record_id, net=tiny_net)  # without the bytes
    assert not gone.reproduced and "no longer available" in gone.message
    with pytest.raises(ArchiveError, match="path traversal"):
        evil = io.BytesIO()
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("../../x.png", _png(1))
        audit_uploaded_files([("evil.zip", evil.getvalue())], tiny_net, None, tmp_path / "u.sqlite")


def test_measure_throughput_reports_all_three(tiny_net):
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tp = measure_throughput(tiny_net, GatePolicy(0.5), x, batch_size=4, repeats=1)
    assert tp["images"] == 8 and 0 < tp["flops_fraction_executed"] < 1
    assert tp["skip_with_shadow_images_per_s"] < min(tp["skip_images_per_s"], tp["full_images_per_s"])
    assert tp["ideal_speedup"] == pytest.approx(1 / tp["flops_fraction_executed"])
    assert tp["meets_target"] == (tp["efficiency"] >= 0.9)
    assert tp["efficiency"] == pytest.approx(tp["speedup"] * tp["flops_fraction_executed"])


def test_default_audit_batch_size_follows_the_activation_size(tiny_net):
    """256 (the cap) for a 32-pixel CIFAR ResNet (16 x 32 x 32 floats per image); smaller when the stem output
    would not fit the budget; the network's BatchNorm statistics and training flag are left alone."""
    tiny_net.train()
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    assert default_audit_batch_size(tiny_net) == 256
    assert default_audit_batch_size(tiny_net, largest=64) == 64
    assert tiny_net.training and all(torch.equal(v, before[k]) for k, v in tiny_net.state_dict().items())
    per_image = 16 * 32 * 32 * 4
    assert default_audit_batch_size(tiny_net, budget_bytes=10 * per_image) == 8
    assert default_audit_batch_size(tiny_net, budget_bytes=per_image // 2) == 1
    tiny_net.eval()


def test_cli_audit_end_to_end(image_folder, tmp_path, capsys):
    out = tmp_path / "rep" / "report.html"
    db = tmp_path / "cli.sqlite"
    rc = main(["audit", str(image_folder), "--model", "cifar_resnet20", "--labels-from-folders", "--out", str(out),
               "--db", str(db), "--batch-size", "4", "--reproduce", "2", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "6 audited, 2 failed" in text and "reproduced 2/2" in text
    assert out.is_file() and out.with_suffix(".json").is_file()
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert len(csv) == 8 and set(csv.loc[csv["status"] == "failed", "input_name"]) == {
        "imgs/cat/broken.png", "imgs/dog/empty.jpg"}
    assert "imgs/cat/broken.png" in out.read_text()
    with AuditStore(db) as st:
        assert st.count() == 8


def test_cli_audit_errors_are_clear(tmp_path, capsys):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.png", _png(0))
    out = str(tmp_path / "r.html")
    assert main(["audit", str(evil), "--model", "cifar_resnet20", "--out", out, "--quiet"]) == 2
    assert "path traversal" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "nope"), "--model", "cifar_resnet20", "--out", out, "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["audit", str(evil), "--model", "cifar_resnet20", "--out", str(tmp_path / "r.txt")]) == 2
    assert "--out must name an .html" in capsys.readouterr().err
    assert not Path(out).exists()


def test_record_json_round_trip():
    rec = AuditRecord(run_id="r", input_name="a.png", input_path=None, status="failed", model_name="m",
                      weights_sha256=None, params_sha256=None, policy={"name": "full"}, device="cpu", versions={},
                      timestamp="2026-01-01T00:00:00+00:00", error="file is empty (0 bytes)")
    assert AuditRecord.from_json(rec.to_json()) == rec
    assert rec.correct is None and rec.executed_mask == [] and rec.flat()["executed_mask"] is None


def test_a_strip_image_is_a_failed_row_and_the_rest_is_audited(tiny_net, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "good.png").write_bytes(_png(1))
    Image.new("RGB", (100_000, 1)).save(root / "strip.png")  # a few hundred bytes, 100,000:1
    run = run_audit([root], tiny_net, GatePolicy(0.5), tmp_path / "a.sqlite")
    assert [r.input_name for r in run.ok_records] == ["in/good.png"]
    assert "aspect ratio" in run.failed_records[0].error


def test_reproducing_needs_the_network_for_unregistered_weights(tiny_net, tmp_path):
    from safetensors.torch import save_file

    from skipviz.audit.store import StoreError

    weights = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net.state_dict().items()}, str(weights))
    net = create_model("cifar_resnet20", weights=str(weights))
    (tmp_path / "a.png").write_bytes(_png(3))
    run = run_audit([tmp_path / "a.png"], net, GatePolicy(0.5), tmp_path / "a.sqlite")
    rid = run.ok_records[0].record_id
    result = reproduce(tmp_path / "a.sqlite", rid)  # no net=: the weights are not registered
    assert not result.reproduced and "pass it (net=...)" in result.message
    assert reproduce(tmp_path / "a.sqlite", rid, net=net).reproduced
    with pytest.raises(StoreError, match="no record 99999"):
        reproduce(tmp_path / "a.sqlite", 99999)


def test_cli_audit_refuses_a_batch_size_below_one(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(image_folder), "--out", str(tmp_path / "r.html"), "--batch-size", "0"])
    assert exc.value.code == 2 and "whole number >= 1" in capsys.readouterr().err
