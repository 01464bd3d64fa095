"""Operating points of a fine-tuned model (the whole export runs in tests/training/test_finetune.py)."""
from __future__ import annotations

import pandas as pd

from skipviz.training.finetune_export import pick_agreement_threshold


def test_pick_agreement_threshold():
    curve = pd.DataFrame({"threshold": [0.3, 0.5, 0.7], "flops_saved_fraction": [0.2, 0.4, 0.6],
                          "agreement_with_full": [0.995, 0.99, 0.9]})
    assert pick_agreement_threshold(curve, 0.99) == 0.5
    assert pick_agreement_threshold(curve, 0.999) is None
