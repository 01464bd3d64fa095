"""The stored form of a logits vector in the audit store (:mod:`skipviz.audit.store`): little-endian float32
bytes. Standard library only."""
from __future__ import annotations

import sys
from array import array
from typing import Sequence

__all__ = ["float32_le", "from_float32_le"]


def float32_le(values: Sequence[float]) -> bytes:
    """Little-endian float32 bytes of ``values`` (the stored form of a logits vector)."""
    a = array("f", values)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        a.byteswap()
    return a.tobytes()


def from_float32_le(blob: bytes) -> list[float]:
    a = array("f")
    a.frombytes(blob)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        a.byteswap()
    return a.tolist()
