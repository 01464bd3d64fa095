"""Policies over data sets: :mod:`~skipviz.evaluate.loop` (the evaluation loop, its result, threshold curves)
and :mod:`~skipviz.evaluate.calibration` (the dashboard's calibration sweep)."""
from .loop import (ImageRuns, PolicyEval, agreement_margin_words, agreement_meets, blocks_by_outcome, curve_row,
                  early_exit_policy, evaluate_policy, operating_point, pick_threshold, run_images, threshold_curve,
                  within_drop)

__all__ = ["ImageRuns", "PolicyEval", "agreement_margin_words", "agreement_meets", "blocks_by_outcome", "curve_row",
           "early_exit_policy", "evaluate_policy", "operating_point", "pick_threshold", "run_images",
           "threshold_curve", "within_drop"]
