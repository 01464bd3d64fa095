"""The audit store: one SQLite file (stdlib ``sqlite3``) holding runs and their per-input records.

Durability and concurrency:

* WAL journal mode and ``synchronous=FULL``: a process killed at any point (kill -9) leaves a consistent
  database; only the transaction in flight is lost.
* Each batch of records is written in ONE ``BEGIN IMMEDIATE`` transaction, so a batch is all-or-nothing.
* ``busy_timeout``: a second process writing at the same time waits for the lock instead of failing.
* A run records its owner (host, process id and the process's start time). A run still ``running`` whose
  process on this host has ended (kill -9, power loss of a worker) is marked ``interrupted`` the next time
  the database is opened, with the last batch it stored (:meth:`AuditStore.reap_dead_runs`); it is never
  left ``running``. Such a run can be continued (:meth:`AuditStore.reopen_run`, ``skipviz audit --resume``).

The module imports only the standard library at load time, and so do its schema
(:mod:`skipviz.audit._store_schema`), a run's owner (:mod:`skipviz.audit._store_owner`) and the stored logits
(:mod:`skipviz.audit._store_blob`); pandas, the record class (:mod:`skipviz.audit.records`, the layer below
this one) and the record queries built on it (:mod:`skipviz.audit._store_queries`) are imported when used. A
writer process can therefore load this folder's store files without the package and starts quickly.

Schema versioning: the version lives in ``PRAGMA user_version`` (and in the ``meta`` table for people reading
the file). Opening a file written by a NEWER SkipViz raises :class:`SchemaVersionError`; an older one is
migrated in place by the steps in ``MIGRATIONS`` (:mod:`skipviz.audit._store_schema`; version 1 -> 2 adds the
run's last batch, owner and heartbeat; a version-1 file stays readable and its runs keep their records; 2 -> 3
adds the full network's outputs that later audits reuse, :mod:`skipviz.audit.shadow`).
"""
from __future__ import annotations

import json
import sqlite3
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ._store_blob import float32_le, from_float32_le
from ._store_owner import current_owner, owner_alive
from ._store_schema import MIGRATIONS, SCHEMA_VERSION

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .records import AuditRecord

_SCHEMA_V1 = MIGRATIONS[0]  # the version-1 schema (tests build a version-1 file from it)
BUSY_TIMEOUT_MS = 30_000

RUN_STATUSES = ("running", "finished", "interrupted")


class StoreError(RuntimeError):
    """The audit database could not be opened or used; the message says why."""


class SchemaVersionError(StoreError):
    """The database was written by a newer SkipViz with a schema this version does not know."""


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (sortable, what the store compares dates with)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class AuditStore:
    """Runs and records in one SQLite file. Safe to share between threads of a process and between processes.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder; give a database file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=timeout_ms / 1000, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
            self._refuse_newer_schema()  # before anything writes to the file (switching to WAL does)
            self._set_wal(timeout_ms)
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
            self.reap_dead_runs()
        except (sqlite3.DatabaseError, StoreError) as e:
            if getattr(self, "_conn", None) is not None:
                self._conn.close()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{self.path}: not a usable SkipViz audit database ({e})") from e

    def _set_wal(self, timeout_ms: int) -> None:
        """Switch to WAL. When two processes open a new file at once, SQLite can answer "database is locked"
        at once, without its busy handler (switching the journal mode needs an exclusive lock), so retry with
        a short back-off until ``timeout_ms``."""
        deadline = time.monotonic() + timeout_ms / 1000
        delay = 0.005
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: could not switch to WAL journal mode (got {mode})")

    # -------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "AuditStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _refuse_newer_schema(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path}: audit database schema version {version} is newer than this SkipViz supports "
                f"({SCHEMA_VERSION}); upgrade SkipViz to read it (the file was left untouched)")

    def _migrate(self) -> None:
        version = self.schema_version
        if version == SCHEMA_VERSION:
            return
        with self._transaction() as conn:  # re-read inside the write lock: another process may have migrated
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(f"{self.path}: upgraded to schema version {version} by a newer SkipViz "
                                         f"while opening; this one supports {SCHEMA_VERSION}")
            while version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                version += 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(version),))
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_at', ?)", (utc_now(),))

    class _Tx:
        def __init__(self, store: "AuditStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._conn

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _transaction(self) -> "AuditStore._Tx":
        return AuditStore._Tx(self)

    # ------------------------------------------------------------------------------------------ writes
    def create_run(self, run_id: str, model_name: str, weights_sha256: str | None, policy: dict,
                   config: dict) -> None:
        """Register a run (status ``running``, owned by this process) with its configuration."""
        with self._transaction() as conn:
            now = utc_now()
            conn.execute("INSERT INTO runs(run_id, created_at, status, model_name, weights_sha256, policy_json, "
                         "config_json, owner_json, heartbeat_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                         (run_id, now, model_name, weights_sha256, json.dumps(policy, sort_keys=True),
                          json.dumps(config, sort_keys=True, default=str), json.dumps(current_owner()), now))

    def reopen_run(self, run_id: str, config: dict | None = None) -> None:
        """Continue an interrupted (or finished) run in this process: status ``running`` again, owned by this
        process; ``config`` replaces the stored configuration (e.g. the new input count). Refused while the run's
        own process still runs."""
        with self._transaction() as conn:
            row = conn.execute("SELECT status, owner_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"{self.path}: no run {run_id!r}")
            owner = json.loads(row[1]) if row[1] else None
            if row[0] == "running" and owner != current_owner() and owner_alive(owner) is not False:
                raise StoreError(f"{self.path}: run {run_id} is still running (process {(owner or {}).get('pid')} "
                                 f"on {(owner or {}).get('host')}); it cannot be resumed twice at once")
            conn.execute("UPDATE runs SET status = 'running', finished_at = NULL, owner_json = ?, heartbeat_at = ?"
                         + (", config_json = ?" if config is not None else "") + " WHERE run_id = ?",
                         (json.dumps(current_owner()), utc_now(),
                          *([json.dumps(config, sort_keys=True, default=str)] if config is not None else []), run_id))

    def finish_run(self, run_id: str, summary: dict | None = None, status: str = "finished") -> None:
        """Close a run as ``finished`` or ``interrupted`` (with its record count and summary)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}; one of {RUN_STATUSES}")
        with self._transaction() as conn:
            n = conn.execute("SELECT COUNT(*) FROM records WHERE run_id = ?", (run_id,)).fetchone()[0]
            conn.execute("UPDATE runs SET finished_at = ?, status = ?, n_records = ?, summary_json = ? "
                         "WHERE run_id = ?", (utc_now(), status, n,
                                              None if summary is None else json.dumps(summary, default=str),
                                              run_id))

    def reap_dead_runs(self) -> list[str]:
        """Mark ``interrupted`` every run still ``running`` whose process on this host has ended (killed, crashed),
        with its record count, its last stored batch and the reason in its summary; returns their ids. Runs of a
        live process, or of another host, are left alone."""
        with self._lock:
            rows = self._conn.execute("SELECT run_id, owner_json FROM runs WHERE status = 'running'").fetchall()
        dead = [rid for rid, owner in rows if owner_alive(json.loads(owner) if owner else None) is False]
        for rid in dead:
            with self._transaction() as conn:
                row = conn.execute("SELECT status, owner_json, last_batch, summary_json FROM runs WHERE run_id = ?",
                                   (rid,)).fetchone()
                if row is None or row[0] != "running" or owner_alive(json.loads(row[1]) if row[1] else None) \
                        is not False:
                    continue  # finished or taken over meanwhile
                n = conn.execute("SELECT COUNT(*) FROM records WHERE run_id = ?", (rid,)).fetchone()[0]
                owner = json.loads(row[1])
                summary = json.loads(row[3]) if row[3] else {}
                summary["interrupted"] = (f"process {owner.get('pid')} on {owner.get('host')} ended without "
                                          f"finishing the run (killed?); {n} records stored, last batch "
                                          f"{row[2] if row[2] is not None else 'none'}")
                conn.execute("UPDATE runs SET status = 'interrupted', finished_at = ?, n_records = ?, "
                             "summary_json = ? WHERE run_id = ?", (utc_now(), n, json.dumps(summary), rid))
        return dead

    def add_records(self, records: Sequence["AuditRecord"],
                    full_output_keys: Sequence[str | None] | None = None) -> list[int]:
        """Insert a batch of records in one transaction (all or nothing); returns their ``record_id``s and sets
        them on the records. The run's last batch and heartbeat are updated in the same transaction.

        ``full_output_keys``: one per record, the key under which its full-network logits (``full_logits``,
        float32) are kept for later audits to reuse (:func:`~skipviz.audit.shadow.full_output_key`), or ``None``
        for a record whose full output is not to be kept (not computed in its batch). A key already kept keeps
        its first record."""
        ids: list[int] = []
        keys = list(full_output_keys) if full_output_keys is not None else [None] * len(records)
        if len(keys) != len(records):
            raise ValueError(f"{len(keys)} full-output keys for {len(records)} records")
        with self._transaction() as conn:
            # one executemany (its loop in C; half the time of one execute per record, measured for 256 ResNet-56
            # records); the ids follow from the table's AUTOINCREMENT counter: this transaction holds the only
            # write lock (BEGIN IMMEDIATE), so its rows take the next len(records) ids in order
            conn.executemany(
                "INSERT INTO records(run_id, batch_index, batch_pos, timestamp, status, input_name, "
                "input_sha256, model_name, weights_sha256, label, predicted_label, full_predicted_label, "
                "agree, record_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.run_id, r.batch_index, r.batch_pos, r.timestamp, r.status, r.input_name, r.input_sha256,
                  r.model_name, r.weights_sha256, r.label, r.predicted_label, r.full_predicted_label,
                  None if r.agree is None else int(r.agree), r.to_json()) for r in records])
            if records:
                last = int(conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()[0])
                ids = list(range(last - len(records) + 1, last + 1))
            for r, key, rid in zip(records, keys, ids):
                if key is not None and r.full_logits is not None:
                    conn.execute("INSERT OR IGNORE INTO full_outputs(key, record_id, logits) VALUES (?, ?, ?)",
                                 (key, rid, float32_le(r.full_logits)))
            for run_id in {r.run_id for r in records}:
                batches = [r.batch_index for r in records if r.run_id == run_id and r.batch_index is not None]
                conn.execute("UPDATE runs SET heartbeat_at = ?, n_records = (SELECT COUNT(*) FROM records WHERE "
                             "run_id = ?), last_batch = MAX(COALESCE(last_batch, -1), ?) WHERE run_id = ?",
                             (utc_now(), run_id, max(batches) if batches else -1, run_id))
        for r, i in zip(records, ids):
            r.record_id = i
        return ids

    def full_outputs(self, keys: Iterable[str]) -> dict[str, tuple[int, list[float]]]:
        """The kept full-network outputs among ``keys``: key -> (record id, logits as Python floats, exactly the
        float32 values stored)."""
        wanted = list(dict.fromkeys(keys))
        out: dict[str, tuple[int, list[float]]] = {}
        with self._lock:
            for s in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                part = wanted[s: s + 500]
                rows = self._conn.execute(
                    f"SELECT key, record_id, logits FROM full_outputs WHERE key IN ({','.join('?' * len(part))})",
                    part).fetchall()
                for key, rid, blob in rows:
                    if isinstance(blob, bytes) and len(blob) % 4 == 0:  # anything else is not a kept output
                        out[key] = (int(rid), from_float32_le(blob))
        return out

    # ----------------------------------------------------------------------------------------- queries
    def query(self, run_id: str | None = None, model_name: str | None = None, input_sha256: str | None = None,
              since: str | datetime | None = None, until: str | datetime | None = None,
              status: str | None = None, record_ids: Iterable[int] | None = None,
              batch_index: int | None = None, limit: int | None = None) -> list["AuditRecord"]:
        """Records matching every given filter, in insertion order. ``since``/``until``: ISO strings or
        datetimes (naive = UTC), inclusive."""
        from ._store_queries import records_from_rows, select_records  # on use: they need the record class

        sql, args = select_records(run_id=run_id, model_name=model_name, input_sha256=input_sha256, since=since,
                                   until=until, status=status, record_ids=record_ids, batch_index=batch_index,
                                   limit=limit)
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return records_from_rows(rows)

    def get(self, record_id: int) -> "AuditRecord":
        found = self.query(record_ids=[record_id])
        if not found:
            raise StoreError(f"{self.path}: no record {record_id}")
        return found[0]

    def count(self, run_id: str | None = None) -> int:
        with self._lock:
            if run_id is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
            return int(self._conn.execute("SELECT COUNT(*) FROM records WHERE run_id = ?", (run_id,)).fetchone()[0])

    def run_info(self, run_id: str) -> dict[str, Any]:
        runs = self.runs()
        match = runs[runs["run_id"] == run_id]
        if match.empty:
            raise StoreError(f"{self.path}: no run {run_id!r}")
        return match.iloc[0].to_dict()

    def recorded_inputs(self, run_id: str) -> list[tuple[str, str | None]]:
        """``(input_name, input_path)`` of every record of a run, in the order they were stored (what a resumed
        audit skips; see :func:`skipviz.audit.archive.input_keys`)."""
        with self._lock:
            rows = self._conn.execute("SELECT input_name, json_extract(record_json, '$.input_path') FROM records "
                                      "WHERE run_id = ? ORDER BY record_id", (run_id,)).fetchall()
        return [(str(n), p) for n, p in rows]

    def last_batch(self, run_id: str) -> int | None:
        """The highest batch index stored for a run (``None`` before its first batch)."""
        with self._lock:
            row = self._conn.execute("SELECT MAX(batch_index) FROM records WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def runs(self) -> "pd.DataFrame":
        """One row per run: id, times, status (``running``, ``finished`` or ``interrupted``; older files may say
        ``aborted``), model, weights hash, policy, configuration and summary (parsed), last batch, owner."""
        import pandas as pd

        self.reap_dead_runs()
        with self._lock:
            df = pd.read_sql_query("SELECT run_id, created_at, finished_at, status, model_name, weights_sha256, "
                                   "policy_json, config_json, n_records, summary_json, last_batch, owner_json, "
                                   "heartbeat_at FROM runs ORDER BY created_at", self._conn)
        for col in ("policy_json", "config_json", "summary_json", "owner_json"):
            df[col.removesuffix("_json")] = df.pop(col).map(lambda s: json.loads(s) if isinstance(s, str) else None)
        return df

    def records_dataframe(self, **filters: Any) -> "pd.DataFrame":
        """:meth:`query` as a flat table (one row per record; see ``AuditRecord.flat``)."""
        from .records import records_to_dataframe  # on use, as AuditRecord in query()

        return records_to_dataframe(self.query(**filters))

    def snapshot(self, dest: str | Path | None = None) -> bytes:
        """A consistent copy of the whole database (SQLite's online backup, safe while other writers work), as
        bytes (what the dashboard offers for download); also written to ``dest`` when given."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "copy.sqlite"
            target = sqlite3.connect(str(path))
            try:
                with self._lock:
                    self._conn.backup(target)
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
            data = path.read_bytes()
        if dest is not None:
            Path(dest).write_bytes(data)
        return data

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result (``"ok"`` for a healthy file)."""
        with self._lock:
            return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])


def open_store(db: "str | Path | AuditStore") -> "tuple[AuditStore, bool]":
    """``(store, owned)``: ``db`` itself when it is an open :class:`AuditStore` (the caller keeps it), else a new
    store on that path that the caller owns and closes."""
    return (db, False) if isinstance(db, AuditStore) else (AuditStore(db), True)
