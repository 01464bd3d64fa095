"""Batch audits, records, reproduction and the ``skipviz audit`` command, on a tiny random network."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skipviz import GatePolicy, create_model
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
                    batch_size=3, progress=lambda f, t: calls.append((f, t)), latency_rounds=3)
    assert len(run.records) == 8 and len(run.ok_records) == 6
    assert calls[-1] == (1.0, "8/8 inputs")
    failed = {r.input_name: r for r in run.failed_records}
    assert set(failed) == {"imgs/cat/broken.png", "imgs/dog/empty.jpg"}
    assert failed["imgs/cat/broken.png"].error.startswith("imgs/cat/broken.png: image is damaged or truncated")
    assert "empty" in failed["imgs/dog/empty.jpg"].error
    # a failed row keeps the SHA-256 of the bytes it could read
    assert failed["imgs/cat/broken.png"].input_sha256 == hashlib.sha256(_png(99)[:60]).hexdigest()
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
        assert base64.b64decode(r.thumbnail_png_b64)[:3] == b"\xff\xd8\xff"  # a small JPEG (a sample, <= 32)
    non_square = next(r for r in run.ok_records if r.input_name == "imgs/dog/2.png")
    assert non_square.image["width"] == 40 and non_square.full_logits == [float(v) for v in full]
    assert sum(r.executed_mask.count(False) for r in run.ok_records) > 0  # the tiny net's gates do skip
    tp = run.throughput()
    assert tp["images"] == 6 and tp["skip_with_shadow_images_per_s"] < tp["skip_images_per_s"]
    assert 0 < tp["end_to_end_images_per_s"] < tp["skip_with_shadow_images_per_s"]
    lat = run.latency  # measured on the run's own inputs, apart from decoding: full and skipped, paired
    assert lat["rounds"] == 3 and lat["sample_size"] == 3 and lat["ci_low_ms"] <= lat["saving_ms"] <= lat["ci_high_ms"]
    assert "per image" in lat["label"] and "decoding and I/O" in lat["method"]
    with AuditStore(tmp_path / "a.sqlite") as st:
        stored = st.query(run_id=run.run_id)
        assert [r.to_dict() for r in stored] == [r.to_dict() for r in run.records]
        assert st.runs().set_index("run_id").loc[run.run_id, "status"] == "finished"
    again = load_run(tmp_path / "a.sqlite", run.run_id)
    assert again.records == run.records and again.timings == run.timings and again.policy == run.policy
    assert again.latency == run.latency and again.status == "finished"


def test_reproduce_bit_for_bit_and_detects_changes(tiny_net, image_folder, tmp_path):
    db = tmp_path / "r.sqlite"
    run = run_audit([image_folder], tiny_net, GatePolicy(0.4), db, batch_size=4, latency_rounds=0)
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
                               batch_size=2, latency_rounds=0)
    assert [(r.input_name, r.label, r.status) for r in run.records] == [
        ("cat/1.png", "cat", "ok"), ("cat/2.png", "cat", "ok"), ("bad.png", None, "failed"),
        ("more.zip/bird/5.png", "bird", "ok"), ("more.zip/bird/6.png", "bird", "ok")]
    assert run.failed_records[0].error.startswith("bad.png: ")  # messages name the uploaded file
    assert run.failed_records[0].input_sha256 == hashlib.sha256(b"GIF89a nope").hexdigest()
    assert len(run.sources) == 5 and all(r.input_path is None for r in run.records)
    results = reproduce_sample(run, tiny_net, k=3)
    assert len(results) == 3 and all(r.reproduced for r in results)
    gone = reproduce(run.db_path, run.ok_records[0].record_id, net=tiny_net)  # without the bytes
    assert not gone.reproduced and "no longer available" in gone.message
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../x.png", _png(1))
        zf.writestr("ok.png", _png(2))
    run = audit_uploaded_files([("evil.zip", evil.getvalue()), ("notes.txt", b"hello")], tiny_net, None,
                               tmp_path / "u.sqlite", latency_rounds=0)
    assert [(r.input_name, r.status) for r in run.records] == [
        ("evil.zip/../../x.png", "failed"), ("evil.zip/ok.png", "ok"), ("notes.txt", "failed")]
    assert "path traversal" in run.records[0].error and "notes.txt: not a recognised image" in run.records[2].error


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
               "--db", str(db), "--batch-size", "4", "--reproduce", "2", "--quiet", "--latency-rounds", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "6 audited, 2 failed, 0 skipped" in text and "reproduced 2/2" in text and "latency (paired, 2 rounds" in text
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
    run = run_audit([root], tiny_net, GatePolicy(0.5), tmp_path / "a.sqlite", latency_rounds=0)
    assert [r.input_name for r in run.ok_records] == ["in/good.png"]
    assert "aspect ratio" in run.failed_records[0].error


def test_reproducing_needs_the_network_for_unregistered_weights(tiny_net, tmp_path):
    from safetensors.torch import save_file

    from skipviz.audit.store import StoreError

    weights = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net.state_dict().items()}, str(weights))
    net = create_model("cifar_resnet20", weights=str(weights))
    (tmp_path / "a.png").write_bytes(_png(3))
    run = run_audit([tmp_path / "a.png"], net, GatePolicy(0.5), tmp_path / "a.sqlite", latency_rounds=0)
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


def test_a_refused_archive_and_a_corrupt_file_do_not_stop_the_audit(tiny_net, tmp_path, capsys):
    """Good images, a corrupt file and a zip with a ``../`` member and a good member: rc 0, every good image
    classified, the corrupt file and the traversal member failed rows, the rest accounted for, nothing written
    outside the output paths."""
    root = tmp_path / "work" / "in"
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"{i}.png").write_bytes(_png(i))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.svg").write_text("<svg/>")
    with zipfile.ZipFile(root / "pack.zip", "w") as zf:
        zf.writestr("../../escaped.png", _png(10))
        zf.writestr("good/in_zip.png", _png(11))
    out = tmp_path / "work" / "rep" / "report.html"
    before = {p for p in tmp_path.rglob("*")}
    rc = main(["audit", str(root), "--model", "cifar_resnet20", "--out", str(out), "--quiet", "--batch-size", "3",
               "--reproduce", "0", "--latency-rounds", "0"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    status = {r["input_name"]: r["status"] for r in report["records"]}
    assert status == {**{f"in/{i}.png": "ok" for i in range(4)}, "in/pack.zip/good/in_zip.png": "ok",
                      "in/corrupt.jpg": "failed", "in/pack.zip/../../escaped.png": "failed",
                      "in/notes.svg": "skipped"}
    assert report["summary"]["n_failed"] == 2 and report["summary"]["n_skipped"] == 1
    assert {f["input_name"] for f in report["failed"]} == {"in/corrupt.jpg", "in/pack.zip/../../escaped.png"}
    written = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(out.parent) for p in written), written
    assert not any(p.name == "escaped.png" for p in tmp_path.rglob("*"))
    page = out.read_text()
    assert "Failed inputs (2)" in page and "Skipped inputs: not images (1)" in page and "path traversal" in page


def _folder_of(n: int, root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i:04d}.png").write_bytes(_png(i, (8, 8)))
    return root


def test_kill_9_mid_audit_then_resume_lists_every_input_once(tiny_net, tmp_path):
    """A real ``skipviz audit`` process killed with SIGKILL mid-run loses at most its batch in flight; the run is
    then interrupted (never left running) and ``--resume`` completes it: 1,500 records, each input once."""
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net.state_dict().items()}, str(weights))
    root = _folder_of(1500, tmp_path / "in")
    db, out = tmp_path / "a.sqlite", tmp_path / "rep" / "report.html"
    cmd = [sys.executable, "-m", "skipviz", "audit", str(root), "--model", "cifar_resnet20", "--weights",
           str(weights), "--db", str(db), "--out", str(out), "--batch-size", "50", "--quiet", "--reproduce", "2",
           "--latency-rounds", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline, stored = time.monotonic() + 120, 0
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            with contextlib.suppress(sqlite3.Error):
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                stored = con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
                con.close()
        if stored >= 300:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with AuditStore(db) as st:
        run = st.runs().iloc[0]
        assert run["status"] == "interrupted" and 300 <= run["n_records"] < 1500
        assert run["n_records"] % 50 == 0  # whole batches only
        assert run["last_batch"] == run["n_records"] // 50 - 1
        first_part = run["n_records"]
    assert not out.exists()  # the killed process never got to its report
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{first_part} inputs were already recorded" in done.stdout
    report = json.loads(out.with_suffix(".json").read_text())
    names = [r["input_name"] for r in report["records"]]
    assert len(names) == 1500 and len(set(names)) == 1500
    assert report["summary"]["status"] == "finished" and report["summary"]["resumed_from_records"] == first_part
    with AuditStore(db) as st:
        assert len(st.runs()) == 1 and st.count() == 1500
        assert st.runs().iloc[0]["status"] == "finished"


def test_an_interrupted_run_is_stored_as_interrupted_and_resumes(tiny_net, tmp_path):
    root = _folder_of(10, tmp_path / "in")
    db = tmp_path / "i.sqlite"

    def stop_after_two_batches(fraction: float, text: str) -> None:
        if text.startswith("6/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_audit([root], tiny_net, GatePolicy(0.5), db, batch_size=3, progress=stop_after_two_batches,
                  latency_rounds=0)
    with AuditStore(db) as st:
        info = st.runs().iloc[0]
        assert info["status"] == "interrupted" and info["n_records"] == 6
        assert "KeyboardInterrupt" in info["summary"]["interrupted"] and info["summary"]["last_batch"] == 1
    other = run_audit([root], tiny_net, GatePolicy(0.7), db, batch_size=3, resume=True, latency_rounds=0)
    assert other.run_id != info["run_id"] and len(other.records) == 10  # another policy: a new run
    run = run_audit([root], tiny_net, GatePolicy(0.5), db, batch_size=3, resume=True, latency_rounds=2)
    assert run.run_id == info["run_id"] and run.resumed == 6
    assert sorted(r.input_name for r in run.records) == [f"in/{i:04d}.png" for i in range(10)]
    assert sorted({r.batch_index for r in run.records}) == [0, 1, 2, 3]  # batches continue, never reused
    assert run.latency is not None and run.latency["sample_size"] == 3  # the first batch of this attempt
    again = run_audit([root], tiny_net, GatePolicy(0.5), db, batch_size=3, resume=True, latency_rounds=1)
    assert again.run_id == run.run_id and len(again.records) == 10 and again.resumed == 10
    assert again.latency is not None and again.latency["sample_size"] == 10  # re-read from the stored sources


def test_csv_round_trips_the_executed_mask_and_guards_formulas(tiny_net, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.png").write_bytes(_png(i))
    (root / "=HYPERLINK(1).png").write_bytes(_png(7))
    (root / "-3.png").write_bytes(b"broken")
    run = run_audit([root], tiny_net, GatePolicy(0.6), tmp_path / "c.sqlite", latency_rounds=0)
    from skipviz.audit.report import write_report

    paths = write_report(run, tmp_path / "rep" / "r.html")
    csv = pd.read_csv(paths[2], dtype={"executed_mask": str})
    ok = csv[csv["status"] == "ok"].set_index("input_name")
    for r in run.ok_records:
        assert ok.loc[r.input_name, "executed_mask"] == "".join("R" if e else "S" for e in r.executed_mask)
    assert any(m.startswith("S") for m in ok["executed_mask"])  # a first block bypassed: no apostrophe added
    # names are relative to the audited folder: "in/=HYPERLINK(1).png" cannot run as a formula and stays exact
    # (a cell that starts with "=" is guarded: tests/audit/test_report.py)
    assert set(csv["input_name"]) == {"in/" + n for n in ("0.png", "1.png", "2.png", "3.png", "4.png", "5.png",
                                                          "-3.png", "=HYPERLINK(1).png")}
    assert csv.loc[csv["input_name"] == "in/-3.png", "input_sha256"].item() == hashlib.sha256(b"broken").hexdigest()


def test_noisy_latency_is_never_reported_as_a_saving(tiny_net, tmp_path, monkeypatch):
    """The report's latency follows its own interval: a saving whose 95% interval contains zero reads
    "no measurable saving (±x ms)" in the JSON and the HTML, a clear one is reported with its interval."""
    import skipviz.audit.run as run_module
    from skipviz.audit.report import render_report

    class Stats:
        def __init__(self, times_ms):
            self.times_ms, self.number, self.method, self.threads = times_ms, 1, "fake", 1

    def fake(times):
        def measure(fns, **kw):
            return {"full": Stats(times[0]), "skipped": Stats(times[1])}
        return measure

    rng = np.random.default_rng(0)
    noisy = [list(10 + rng.normal(0, 3, 15)), list(10 + rng.normal(0, 3, 15))]
    clear = [[10.0 + 0.01 * i for i in range(15)], [6.0 + 0.01 * i for i in range(15)]]
    (tmp_path / "a.png").write_bytes(_png(1))
    monkeypatch.setattr(run_module, "machine_busy", lambda: None)
    for times, wording in ((noisy, "no measurable saving (±"), (clear, "ms saved (95 % CI")):
        monkeypatch.setattr(run_module, "measure_interleaved", fake(times))
        run = run_audit([tmp_path / "a.png"], tiny_net, GatePolicy(0.5), tmp_path / "n.sqlite", latency_rounds=15)
        page, text, _ = render_report(run)
        lat = json.loads(text)["summary"]["latency"]
        assert lat["label"].startswith(wording.split(" (")[0]) or wording in lat["label"]
        assert wording in page and lat["ci_low_ms"] <= lat["saving_ms"] <= lat["ci_high_ms"]
        if times is noisy:
            assert not lat["measurable"] and lat["saving_fraction"] is None and "slower" not in page
            assert lat["ci_low_ms"] < 0 < lat["ci_high_ms"]
        else:
            assert lat["measurable"] and lat["saving_ms"] == pytest.approx(4.0) and "4.00 ms saved" in page
