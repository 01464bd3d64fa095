"""``AuditRecord`` as plain data: ``to_dict`` has every field (the thumbnail optional) with the values
``dataclasses.asdict`` gives, and the JSON round-trips."""
from __future__ import annotations

import dataclasses

from skipviz.audit.records import AuditRecord

from test_store import make_record


def test_to_dict_has_every_field_as_asdict_and_json_round_trips():
    rec = make_record("r1", 3)
    assert rec.to_dict() == dataclasses.asdict(rec)
    assert set(rec.to_dict(thumbnail=False)) == {f.name for f in dataclasses.fields(AuditRecord)} - {"thumbnail_png_b64"}
    assert AuditRecord.from_json(rec.to_json()) == rec
