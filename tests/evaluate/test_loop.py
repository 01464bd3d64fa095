"""Threshold choice over a measured curve (:mod:`skipviz.evaluate.loop`)."""
from __future__ import annotations

import pandas as pd
import pytest

from skipviz.evaluate import pick_threshold, within_drop


def test_a_drop_of_exactly_the_bound_meets_it():
    drop = 100 * (0.739 - 0.729)  # 10 of 1,000 images: one point, 1.0000000000000009 in floats
    assert drop > 1.0 and within_drop(drop, 1.0) and not within_drop(1.01, 1.0)
    curve = pd.DataFrame({"threshold": [0.1, 0.2, 0.3], "flops_saved_fraction": [0.05, 0.1, 0.2],
                          "accuracy_drop_points": [0.2, drop, 3.0], "accuracy": [0.737, 0.729, 0.709]})
    assert pick_threshold(curve, max_drop_points=1.0) == 0.2
    assert pick_threshold(curve, max_drop_points=0.1) == 0.1  # none meets it: the smallest drop


def test_agreement_meets_asks_for_the_margin_in_standard_errors_of_the_measured_agreement():
    from skipviz.evaluate import agreement_meets

    # 99.1 % of 1,000 is 9 changed answers: meets 99 % as measured, not with one standard error (0.3 points) to spare
    assert agreement_meets(0.991, 1000, 0.99) and not agreement_meets(0.991, 1000, 0.99, margin_se=1.0)
    assert agreement_meets(0.994, 1000, 0.99, margin_se=1.0)
    assert not agreement_meets(0.994, 100, 0.99, margin_se=1.0)  # the same rate on fewer inputs is less sure
    assert agreement_meets(1.0, 20000, 0.9999, margin_se=1.0)
    got = agreement_meets(pd.Series([0.991, 0.994, 0.98]), pd.Series([1000, 1000, 1000]), 0.99, 1.0)
    assert got.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="number of inputs"):
        agreement_meets(0.995, None, 0.99, margin_se=1.0)
