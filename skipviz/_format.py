"""Numbers in words for people (private): percents that never read ``"-0.0%"``, signed percentage points.

One home for the rule, used by the figures, the dashboard's tables and the audit report.
"""
from __future__ import annotations

__all__ = ["percent", "percent_points"]


def percent(fraction: float, digits: int = 1) -> str:
    """A fraction as a percent, as ``f"{fraction:.1%}"`` but never ``"-0.0%"``: a value that rounds to zero is
    ``"0.0%"``."""
    text = f"{float(fraction):.{digits}%}"
    return text[1:] if text.startswith("-") and float(text[1:-1]) == 0 else text


def percent_points(delta: float, digits: int = 1) -> str:
    """A difference of two fractions in percentage points, signed (``"+1.2 pts"``, ``"-3.0 pts"``), never
    ``"-0.0 pts"``."""
    text = f"{100 * float(delta):+.{digits}f}"
    if float(text) == 0:
        text = f"{0.0:+.{digits}f}"
    return f"{text} pts"
