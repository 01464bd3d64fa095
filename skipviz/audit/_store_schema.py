"""The audit database's schema (private; :mod:`skipviz.audit.store` opens, migrates and uses it).

The version lives in ``PRAGMA user_version`` (and in the ``meta`` table for people reading the file).
``MIGRATIONS[v]`` upgrades a database at version ``v`` to ``v + 1``, run inside one transaction: version 0 (a new
or unversioned file) -> 1 creates the ``meta``, ``runs`` and ``records`` tables and their indexes; 1 -> 2 adds the
run's last batch, owner and heartbeat (a version-1 file stays readable and its runs keep their records); 2 -> 3
adds ``full_outputs``, the full network's logits per (model, parameters, preprocessing, device, input bytes) that
later audits reuse (:mod:`skipviz.audit.shadow`).
Plain text, no imports: the store loads with the standard library alone.
"""
from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 3

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    model_name TEXT NOT NULL,
    weights_sha256 TEXT,
    policy_json TEXT NOT NULL,
    config_json TEXT NOT NULL,
    n_records INTEGER NOT NULL DEFAULT 0,
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS records (
    record_id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    batch_index INTEGER,
    batch_pos INTEGER,
    timestamp TEXT NOT NULL,
    status TEXT NOT NULL,
    input_name TEXT NOT NULL,
    input_sha256 TEXT,
    model_name TEXT NOT NULL,
    weights_sha256 TEXT,
    label TEXT,
    predicted_label TEXT,
    full_predicted_label TEXT,
    agree INTEGER,
    record_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_run ON records(run_id, batch_index, batch_pos);
CREATE INDEX IF NOT EXISTS records_model ON records(model_name);
CREATE INDEX IF NOT EXISTS records_sha ON records(input_sha256);
CREATE INDEX IF NOT EXISTS records_time ON records(timestamp);
"""

_V1_TO_V2 = """
ALTER TABLE runs ADD COLUMN last_batch INTEGER;
ALTER TABLE runs ADD COLUMN owner_json TEXT;
ALTER TABLE runs ADD COLUMN heartbeat_at TEXT;
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""

_V2_TO_V3 = """
CREATE TABLE IF NOT EXISTS full_outputs (
    key TEXT PRIMARY KEY,
    record_id INTEGER NOT NULL REFERENCES records(record_id),
    logits BLOB NOT NULL
);
"""

# MIGRATIONS[v] upgrades a database at version v to v + 1 (run inside one transaction).
MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1, 1: _V1_TO_V2, 2: _V2_TO_V3}
