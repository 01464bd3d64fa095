"""The SQLite audit store: round trip, queries, schema versioning, crash safety, concurrent writers."""
from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import skipviz.audit.store as store_module
from skipviz.audit.store import SCHEMA_VERSION, AuditStore, SchemaVersionError, StoreError
from skipviz.audit import AuditRecord


def make_record(run_id: str, i: int, model: str = "cifar_resnet20", status: str = "ok",
                timestamp: str | None = None) -> AuditRecord:
    trace = {"policy": "gates", "policy_config": {"name": "gates", "threshold": 0.5, "overrides": {}},
             "blocks": [{"index": 0, "name": "stage1.block0", "downsample": False, "executed": i % 2 == 0,
                         "score": 0.25 + i / 100, "threshold": 0.5, "reason": "gate", "flops": 10}],
             "logits": [0.1 * i, -1.0 / 3.0], "predicted_index": 0, "predicted_label": "cat", "confidence": 0.6,
             "blocks_executed": 1, "blocks_total": 1, "flops_executed": 110, "flops_full": 120, "exit_block": None,
             "extra": {}, "flops_saved": 10, "flops_saved_fraction": 10 / 120}
    return AuditRecord(run_id=run_id, input_name=f"img{i}.png", input_path=f"/data/img{i}.png", status=status,
                       model_name=model, weights_sha256="ab" * 32, params_sha256="cd" * 32,
                       policy={"name": "gates", "threshold": 0.5, "overrides": {}}, device="cpu",
                       versions={"torch": "x"}, timestamp=timestamp or store_module.utc_now(),
                       input_sha256=f"{i:064x}", image={"format": "PNG", "width": 32, "height": 32},
                       label="cat", error=None if status == "ok" else "broken", trace=trace if status == "ok" else None,
                       predicted_index=0, predicted_label="cat", confidence=0.6, full_logits=[0.3, 1e-300],
                       full_predicted_index=1, full_predicted_label="dog", full_confidence=0.55, agree=False,
                       kl_full_skipped=0.125, flops_executed=110, flops_full=120, blocks_executed=1, blocks_total=1,
                       latency_ms=1.5, full_latency_ms=2.0, batch_index=0, batch_pos=i, batch_size=4,
                       thumbnail_png_b64="iVBOR")


def test_record_round_trip_and_queries(tmp_path):
    with AuditStore(tmp_path / "a.sqlite") as st:
        st.create_run("r1", "cifar_resnet20", "ab" * 32, {"name": "gates"}, {"batch_size": 4})
        st.create_run("r2", "resnet18", None, {"name": "full"}, {})
        old = (datetime.now(timezone.utc) - timedelta(days=3)).isoformat()
        recs = [make_record("r1", i) for i in range(3)] + [make_record("r2", 9, model="resnet18", timestamp=old),
                                                           make_record("r2", 10, model="resnet18", status="failed")]
        ids = st.add_records(recs)
        assert ids == [r.record_id for r in recs] == sorted(ids)
        back = st.get(ids[1])
        assert back == recs[1]  # every field, floats exactly (1e-300, -1/3) included
        assert back.trace["logits"][1] == -1.0 / 3.0
        assert [r.input_name for r in st.query(run_id="r1")] == ["img0.png", "img1.png", "img2.png"]
        assert len(st.query(model_name="resnet18")) == 2
        assert [r.record_id for r in st.query(input_sha256=f"{9:064x}")] == [ids[3]]
        assert [r.input_name for r in st.query(until=datetime.now(timezone.utc) - timedelta(days=1))] == ["img9.png"]
        assert len(st.query(since=datetime.now() - timedelta(hours=1))) == 4  # naive datetimes are UTC
        assert [r.error for r in st.query(status="failed")] == ["broken"]
        st.finish_run("r1", {"n_ok": 3})
        runs = st.runs().set_index("run_id")
        assert runs.loc["r1", "status"] == "finished" and runs.loc["r1", "n_records"] == 3
        assert runs.loc["r1", "config"] == {"batch_size": 4} and runs.loc["r1", "summary"] == {"n_ok": 3}
        assert runs.loc["r2", "status"] == "running"
        df = st.records_dataframe(run_id="r1")
        assert list(df["executed_mask"]) == ["R", "S", "R"] and df["agree"].eq(False).all()
        with pytest.raises(StoreError, match="no record"):
            st.get(12345)


def test_wal_mode_and_schema_version(tmp_path):
    path = tmp_path / "v.sqlite"
    with AuditStore(path) as st:
        assert st.schema_version == SCHEMA_VERSION
        assert st.integrity_check() == "ok"
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(SchemaVersionError, match="newer than this SkipViz supports"):
        AuditStore(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # left untouched
    con.close()


def test_migrates_an_unversioned_database(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE unrelated (x)")
    con.commit()
    con.close()
    with AuditStore(path) as st:
        assert st.schema_version == SCHEMA_VERSION
        st.create_run("r", "m", None, {}, {})
        st.add_records([make_record("r", 0)])
        assert st.count() == 1


def test_bad_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable SkipViz audit database"):
        AuditStore(junk)
    with pytest.raises(StoreError, match="is a folder"):
        AuditStore(tmp_path)


# Writer processes load skipviz/audit/store.py and its schema module on their own, as a package of their own
# without skipviz's __init__ (standard library only), so they start in well under a second even on a busy
# machine; the records they write are complete AuditRecord JSON from a template.
WRITER = r"""
import importlib.util, json, sys, time
from pathlib import Path
from types import ModuleType, SimpleNamespace
package = ModuleType("skipviz_store_only")
package.__path__ = [str(Path(sys.argv[1]).parent)]
sys.modules[package.__name__] = package
spec = importlib.util.spec_from_file_location("skipviz_store_only.store", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
assert not {"skipviz", "torch", "numpy", "pandas"} & {name.split(".")[0] for name in sys.modules}  # stdlib only
db, run_id, batches, per_batch = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
template = json.loads(Path(sys.argv[6]).read_text())
go = Path(sys.argv[7]) if len(sys.argv) > 7 else None
while go is not None and not go.exists():
    time.sleep(0.01)

def record(b, i):
    d = dict(template, run_id=run_id, batch_index=b, batch_pos=i, input_name=f"{run_id}-{b}-{i}.png",
             timestamp=mod.utc_now())
    return SimpleNamespace(**d, to_json=lambda d=d: json.dumps(d))

store = mod.AuditStore(db)
store.create_run(run_id, "m", None, {"name": "full"}, {})
b = 0
while batches < 0 or b < batches:
    store.add_records([record(b, i) for i in range(per_batch)])
    print(f"committed {b}", flush=True)
    b += 1
store.finish_run(run_id)
store.close()
"""


def _writer(tmp_path: Path, db: Path, run_id: str, batches: int, per_batch: int, go: Path | None = None):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    template = tmp_path / "template.json"
    template.write_text(make_record("t", 0).to_json())
    args = [sys.executable, str(script), store_module.__file__, str(db), run_id, str(batches), str(per_batch),
            str(template)] + ([str(go)] if go else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_writer_leaves_readable_db(tmp_path):
    db = tmp_path / "crash.sqlite"
    per_batch = 40
    proc = _writer(tmp_path, db, "crash", -1, per_batch)  # writes until killed
    committed = -1
    deadline = time.monotonic() + 60
    while committed < 5 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed = int(line.split()[1])
    proc.send_signal(signal.SIGKILL)  # kill -9, most likely in the middle of the next transaction
    proc.wait(timeout=30)
    assert committed >= 5, proc.stderr.read()
    with AuditStore(db) as st:
        assert st.integrity_check() == "ok"
        n = st.count("crash")
        assert n % per_batch == 0  # no half-written batch
        assert n >= (committed + 1) * per_batch  # nothing acknowledged as committed was lost
        records = st.query(run_id="crash")
        assert {r.batch_index for r in records} == set(range(n // per_batch))
        run = st.runs().set_index("run_id").loc["crash"]  # its process is gone: never left "running"
        assert run["status"] == "interrupted" and run["finished_at"] and run["n_records"] == n
        assert run["last_batch"] == n // per_batch - 1 and "ended without finishing" in run["summary"]["interrupted"]


def test_a_version_1_database_is_migrated_and_keeps_its_runs(tmp_path):
    path = tmp_path / "v1.sqlite"
    con = sqlite3.connect(path)
    con.executescript(store_module._SCHEMA_V1)
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO runs(run_id, created_at, status, model_name, policy_json, config_json, n_records) "
                "VALUES ('old', '2026-01-01T00:00:00+00:00', 'finished', 'm', '{}', '{}', 1)")
    rec = make_record("old", 0)
    con.execute("INSERT INTO records(run_id, batch_index, batch_pos, timestamp, status, input_name, model_name, "
                "record_json) VALUES ('old', 0, 0, ?, 'ok', ?, 'm', ?)", (rec.timestamp, rec.input_name, rec.to_json()))
    con.commit()
    con.close()
    with AuditStore(path) as st:
        assert st.schema_version == SCHEMA_VERSION == 3
        assert st.full_outputs(["any"]) == {}  # the version-3 table of kept full-network outputs exists
        runs = st.runs().set_index("run_id")
        assert runs.loc["old", "status"] == "finished" and runs.loc["old", "last_batch"] is None
        assert st.query(run_id="old")[0].input_name == rec.input_name
        assert st.recorded_inputs("old") == [(rec.input_name, rec.input_path)]


def test_runs_of_a_dead_process_are_marked_interrupted_and_can_be_reopened(tmp_path):
    path = tmp_path / "o.sqlite"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with AuditStore(path) as st:
        st.create_run("live", "m", None, {}, {})
        st.create_run("dead", "m", None, {}, {})
        st.add_records([make_record("dead", 0)])
        owner = {"host": socket.gethostname(), "pid": gone.pid, "start": "1"}
        with st._transaction() as conn:
            conn.execute("UPDATE runs SET owner_json = ? WHERE run_id = 'dead'", (json.dumps(owner),))
    with AuditStore(path) as st:  # opening reaps: the dead owner's run is interrupted, ours still runs
        runs = st.runs().set_index("run_id")
        assert runs.loc["dead", "status"] == "interrupted" and runs.loc["live", "status"] == "running"
        assert "last batch 0" in runs.loc["dead", "summary"]["interrupted"]
        st.reopen_run("dead")
        assert st.runs().set_index("run_id").loc["dead", "status"] == "running"
        st.finish_run("dead")
        with pytest.raises(ValueError, match="unknown run status"):
            st.finish_run("dead", status="aborted!")
        copy = st.snapshot()
    (tmp_path / "copy.sqlite").write_bytes(copy)
    with AuditStore(tmp_path / "copy.sqlite") as st:
        assert st.count("dead") == 1 and st.integrity_check() == "ok"


def test_two_processes_write_at_once(tmp_path):
    db = tmp_path / "shared.sqlite"
    go = tmp_path / "go"
    procs = [_writer(tmp_path, db, f"w{k}", 15, 20, go) for k in range(2)]
    time.sleep(0.3)
    go.touch()  # both start writing at the same moment
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.count("committed") == 15
    with AuditStore(db) as st:
        assert st.count("w0") == st.count("w1") == 300
        assert set(st.runs()["status"]) == {"finished"}
        assert st.integrity_check() == "ok"


def test_date_filters_accept_iso_strings_with_any_offset(tmp_path):
    with AuditStore(tmp_path / "d.sqlite") as st:
        st.create_run("r", "m", "ab" * 32, {"name": "gates"}, {})
        st.add_records([make_record("r", i) for i in range(3)])
        an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
        in_plus_five = an_hour_ago.astimezone(timezone(timedelta(hours=5))).isoformat()  # the same instant
        assert len(st.query(since=in_plus_five)) == 3 == len(st.query(since=an_hour_ago))
        assert len(st.query(until=in_plus_five)) == 0
        assert len(st.query(since=an_hour_ago.strftime("%Y-%m-%dT%H:%M:%SZ"))) == 3
        with pytest.raises(ValueError, match="ISO-8601"):
            st.query(since="yesterday")


def test_a_newer_schema_is_refused_and_the_file_left_untouched(tmp_path):
    import hashlib

    db = tmp_path / "newer.sqlite"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.execute("CREATE TABLE other(x)")
    conn.commit()
    conn.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(SchemaVersionError, match="left untouched"):
        AuditStore(db)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] != "wal"


def test_query_takes_any_number_of_record_ids(tmp_path):
    with AuditStore(tmp_path / "ids.sqlite") as st:
        st.create_run("r", "m", "ab" * 32, {"name": "gates"}, {})
        st.add_records([make_record("r", i) for i in range(3)])
        ids = [r.record_id for r in st.query()]
        assert [r.record_id for r in st.query(record_ids=list(range(-300_000, 0)) + ids[1:])] == ids[1:]
        assert st.query(record_ids=[]) == []
