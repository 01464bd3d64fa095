"""The audit store's record queries (private; :meth:`skipviz.audit.store.AuditStore.query` runs them).

:func:`select_records` turns the query's filters into one SQL statement and its parameters (dates compared as
UTC ISO strings, :func:`iso_utc`; any number of record ids as one JSON array parameter); :func:`records_from_rows`
reads the rows back as :class:`~skipviz.audit.records.AuditRecord` objects. The store imports this module when it
is first queried (the record class needs numpy and pandas), so the store itself loads with the standard library
alone.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Iterable

from .records import AuditRecord

__all__ = ["iso_utc", "records_from_rows", "select_records"]


def iso_utc(value: str | datetime | None) -> str | None:
    """A date bound as the store's UTC ISO string: a ``datetime`` or an ISO-8601 string, with any UTC offset (a
    naive one is taken as UTC); ``ValueError`` for a string that is not ISO-8601."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as e:
            raise ValueError(f"not an ISO-8601 date or time: {value!r}") from e
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def select_records(run_id: str | None = None, model_name: str | None = None, input_sha256: str | None = None,
                   since: str | datetime | None = None, until: str | datetime | None = None,
                   status: str | None = None, record_ids: Iterable[int] | None = None,
                   batch_index: int | None = None, limit: int | None = None) -> tuple[str, list]:
    """The SQL selecting ``(record_id, record_json)`` of the records matching every given filter, in insertion
    order, and its parameters. ``since``/``until``: ISO strings or datetimes (naive = UTC), inclusive."""
    where, args = [], []
    for column, value in (("run_id", run_id), ("model_name", model_name), ("input_sha256", input_sha256),
                          ("status", status), ("batch_index", batch_index)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("timestamp >= ?")
        args.append(iso_utc(since))
    if until is not None:
        where.append("timestamp <= ?")
        args.append(iso_utc(until))
    if record_ids is not None:
        ids = [int(i) for i in record_ids]
        # one JSON array parameter: any number of ids (SQLite limits the number of "?" variables)
        where.append("record_id IN (SELECT value FROM json_each(?))")
        args.append(json.dumps(ids))
    sql = "SELECT record_id, record_json FROM records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY record_id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, args


def records_from_rows(rows: Iterable[tuple[int, str]]) -> list[AuditRecord]:
    """``(record_id, record_json)`` rows as records, each with its ``record_id`` set."""
    out = []
    for rid, text in rows:
        rec = AuditRecord.from_json(text)
        rec.record_id = int(rid)
        out.append(rec)
    return out
