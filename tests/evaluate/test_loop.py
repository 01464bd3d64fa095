"""Threshold choice over a measured curve (:mod:`skipviz.evaluate.loop`)."""
from __future__ import annotations

import pandas as pd

from skipviz.evaluate import pick_threshold, within_drop


def test_a_drop_of_exactly_the_bound_meets_it():
    drop = 100 * (0.739 - 0.729)  # 10 of 1,000 images: one point, 1.0000000000000009 in floats
    assert drop > 1.0 and within_drop(drop, 1.0) and not within_drop(1.01, 1.0)
    curve = pd.DataFrame({"threshold": [0.1, 0.2, 0.3], "flops_saved_fraction": [0.05, 0.1, 0.2],
                          "accuracy_drop_points": [0.2, drop, 3.0], "accuracy": [0.737, 0.729, 0.709]})
    assert pick_threshold(curve, max_drop_points=1.0) == 0.2
    assert pick_threshold(curve, max_drop_points=0.1) == 0.1  # none meets it: the smallest drop
