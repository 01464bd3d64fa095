"""Operating points of a fine-tuned model (the whole export runs in tests/training/test_finetune.py)."""
from __future__ import annotations

import pandas as pd

from skipviz.training.finetune import FinetuneConfig
from skipviz.evaluate import operating_point
from skipviz.training.finetune_export import reproduce_command


def test_the_faithful_point_is_the_largest_cut_keeping_the_agreement():
    curve = pd.DataFrame({"threshold": [0.3, 0.5, 0.7], "flops_saved_fraction": [0.2, 0.4, 0.6],
                          "agreement_with_full": [0.995, 0.99, 0.9]})
    assert operating_point(curve, min_agreement=0.99) == 0.5
    assert operating_point(curve, min_agreement=0.999) is None


def test_the_reproduce_command_says_every_setting_of_the_run():
    cfg = FinetuneConfig(arch="cifar_resnet56", epochs=5, threads=1, autocast_bf16=True, out_dir="runs/r56")
    assert reproduce_command(cfg) == ("skipviz finetune --arch cifar_resnet56 --epochs 5 --seed 0 --target-rate 0.4 "
                                      "--batch-size 128 --val-size 5000 --out runs/r56 --threads 1 --bf16 --export")
    other = reproduce_command(FinetuneConfig(lr=0.05, out_dir="runs/x"))  # a setting the command cannot say
    assert other.startswith("python -c") and "from skipviz.training.finetune_export import" in other
    assert "runs/x/config.json" in other
