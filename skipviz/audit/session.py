"""The dashboard's audit databases: one per browser session, in a server-side folder, never a path from the browser.

* :func:`audit_dir` - the folder: ``$SKIPVIZ_AUDIT_DIR``, else ``<temp>/skipviz_audit`` (created private,
  mode 0700).
* :func:`new_session_token` / :func:`session_db_path` - a session's database is
  ``<folder>/session-<token>.sqlite`` for a random 128-bit token the server draws and keeps in the session's
  state. A path is only ever built from such a token (checked: 32 hex digits), so a browser can neither name a
  file on the server nor open another session's database.
* :func:`prune_sessions` - databases untouched for longer than ``max_age_s`` are removed (with their WAL files).
* :func:`runs_table` - a session database's runs for the page (status, counts, times).

No Streamlit here: ``pages/audit.py`` lays it out.
"""
from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from pathlib import Path

import pandas as pd

from .store import AuditStore

__all__ = ["AUDIT_DIR_ENV", "SESSION_MAX_AGE_S", "audit_dir", "new_session_token", "prune_sessions", "runs_table", "session_db_path"]

AUDIT_DIR_ENV = "SKIPVIZ_AUDIT_DIR"
SESSION_MAX_AGE_S = 7 * 24 * 3600
_TOKEN = re.compile(r"[0-9a-f]{32}")


def audit_dir() -> Path:
    """The server-side folder holding the session databases (``$SKIPVIZ_AUDIT_DIR`` or
    ``<temp>/skipviz_audit``), created with mode 0700 if missing."""
    folder = Path(os.environ.get(AUDIT_DIR_ENV) or Path(tempfile.gettempdir()) / "skipviz_audit")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def new_session_token() -> str:
    """A fresh random session token (128 bits, 32 hex digits)."""
    return secrets.token_hex(16)


def session_db_path(token: str) -> Path:
    """The database of the session holding ``token``; ``ValueError`` for anything but a token
    :func:`new_session_token` could have made (no path, no ``..``, nothing the browser chose)."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ValueError("not a session token")
    return audit_dir() / f"session-{token}.sqlite"


def prune_sessions(max_age_s: float = SESSION_MAX_AGE_S, keep: str | None = None) -> int:
    """Remove session databases (and their ``-wal`` / ``-shm`` files) not modified for ``max_age_s`` seconds,
    except the one of token ``keep``; returns how many databases were removed."""
    folder = audit_dir()
    cutoff = time.time() - max_age_s
    removed = 0
    for db in folder.glob("session-*.sqlite"):
        if keep is not None and db.name == f"session-{keep}.sqlite":
            continue
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        try:
            newest = max(f.stat().st_mtime for f in files if f.exists())
        except (OSError, ValueError):
            continue
        if newest < cutoff:
            for f in files:
                f.unlink(missing_ok=True)
            removed += 1
    return removed


def runs_table(db_path: str | Path) -> pd.DataFrame:
    """One row per run of a session database, newest first: id, status, started, finished, records, audited,
    failed, skipped, model and policy (empty when the database does not exist yet)."""
    cols = ["run", "status", "started", "finished", "records", "audited", "failed", "skipped", "model", "policy"]
    if not Path(db_path).is_file():
        return pd.DataFrame(columns=cols)
    with AuditStore(db_path) as store:
        runs = store.runs()
    rows = []
    for r in runs.to_dict(orient="records")[::-1]:
        summary = r.get("summary") or {}
        rows.append({"run": r["run_id"], "status": r["status"], "started": r["created_at"],
                     "finished": r["finished_at"], "records": int(r["n_records"] or 0),
                     "audited": summary.get("n_ok"), "failed": summary.get("n_failed"),
                     "skipped": summary.get("n_skipped"), "model": r["model_name"],
                     "policy": str(r["policy"])})
    return pd.DataFrame(rows, columns=cols)
