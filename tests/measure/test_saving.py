"""The saving's interval decides the words: a saving whose interval contains zero is never stated as a fact."""
from __future__ import annotations

import numpy as np
import pytest

from skipviz.measure.saving import paired_saving


def test_clear_saving_is_stated_with_its_interval():
    rng = np.random.default_rng(0)
    full = 0.010 + rng.normal(0, 1e-4, 21)
    s = paired_saving(full, full - 0.004 + rng.normal(0, 1e-4, 21))
    assert s.measurable and 0.0035 < s.saving_s < 0.0045 and s.low_s > 0
    assert abs(float(s.label().split()[0]) - 4.0) < 0.3 and "saved" in s.label() and "95 % CI" in s.label()


def test_noise_around_zero_is_no_measurable_saving():
    rng = np.random.default_rng(1)
    full = 0.010 + rng.normal(0, 2e-3, 15)  # a noisy machine: spread far wider than any effect
    s = paired_saving(full, 0.010 + rng.normal(0, 2e-3, 15))
    assert not s.measurable and s.low_s < 0 < s.high_s
    assert s.label().startswith("no measurable saving (±") and "-" not in s.label()


def test_measurably_slower_is_said_so_not_as_a_negative_saving():
    s = paired_saving([1.0, 1.0, 1.0, 1.0], [1.2, 1.21, 1.19, 1.2])
    assert s.measurable and s.saving_s < 0
    assert "slower" in s.label(unit="ms") and "-" not in s.label().split("(")[0]


def test_mismatched_rounds_are_refused():
    with pytest.raises(ValueError):
        paired_saving([1.0, 2.0], [1.0])
