"""Early-exit operating points chosen on a validation split (skipviz.training.exit_points)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from skipviz.data import TensorDataset
from skipviz.evaluate import evaluate_policy
from skipviz.policies import EarlyExitPolicy, FullPolicy
from skipviz.training.exit_points import ExitPointsConfig, exit_operating_points


def _images(n: int, seed: int, labels: torch.Tensor | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = labels if labels is not None else torch.full((n,), -1, dtype=torch.long)
    return TensorDataset(images, y, [str(i) for i in range(10)], [f"{i}.png" for i in range(n)], "mem", "0" * 64)


@pytest.mark.parametrize("labelled", [True, False])
def test_points_follow_their_rules_on_validation_and_are_reported_on_test(tiny_net, labelled):
    val, test = _images(24, 1), _images(16, 2)
    if labelled:  # the full network's own answers as labels: its accuracy is 100 %
        val = _images(24, 1, torch.as_tensor(evaluate_policy(tiny_net, val, FullPolicy()).predictions))
    cfg = ExitPointsConfig(thresholds=(0.0, 0.3, 1.0), min_blocks=(0, 4, 30), batch_size=8)
    val_ref = evaluate_policy(tiny_net, val, FullPolicy())
    test_ref = evaluate_policy(tiny_net, test, FullPolicy())
    out = exit_operating_points(tiny_net, val, val_ref, test, test_ref, cfg)
    assert [r["min_block"] for r in out.choice] == [0, 4]  # 30 is past the last block: not tried
    assert out.min_block in (0, 4) and set(out.validation["min_block"]) == {out.min_block}
    assert len(out.test) == 3 and set(out.test["min_block"]) == {out.min_block}
    never = out.validation[out.validation["threshold"] == 1.0].iloc[0]
    assert never["agreement_with_full"] == 1.0 and never["flops_saved_fraction"] <= 0.0  # probes cost, nobody left
    assert out.points["faithful"]["threshold"] != 1.0  # nobody exits there: the probes cost, nothing is cut
    for name, floor in (("fast", cfg.fast_min_agreement), ("faithful", cfg.min_agreement)):
        point = out.points[name]
        assert point["min_block"] == out.min_block and ("accuracy drop" in point["rule"]) == (labelled and name == "fast")
        if point["threshold"] is None:
            assert not point["rule_met_on_validation"] and point["test"] is None
            continue
        assert point["validation"]["agreement_with_full"] >= floor and point["validation"]["flops_saved_fraction"] > 0
        # the reported test row is what the policy gives when run again
        again = evaluate_policy(tiny_net, test, EarlyExitPolicy(point["threshold"], min_block=out.min_block))
        assert again.summary(test_ref)["flops_saved_fraction"] == pytest.approx(point["test"]["flops_saved_fraction"])
    section = out.card_section(cfg)
    faithful = out.points["faithful"]["threshold"]
    assert section["default_threshold"] == (faithful if faithful is not None else max(cfg.thresholds))


def test_best_takes_the_largest_cut_within_the_bounds_and_never_a_point_that_cuts_nothing():
    from skipviz.evaluate import operating_point

    def _best(curve, max_drop, min_agreement, margin_se=0.0):  # as the exits' points are chosen
        return operating_point(curve, max_drop, min_agreement, margin_se, cutting_only=True)

    curve = pd.DataFrame({"threshold": [0.5, 0.7, 0.9, 1.0],
                          "flops_saved_fraction": [0.30, 0.20, 0.10, -0.001],
                          "agreement_with_full": [0.90, 0.96, 0.995, 1.0],
                          "accuracy_drop_points": [2.0, 0.5, 0.1, 0.0]})
    assert _best(curve, None, 0.99) == 0.9
    assert _best(curve, 1.0, 0.95) == 0.7  # 0.5 cuts more but loses 2 points and 10 % of the answers
    assert _best(curve, None, 0.999) is None  # only the threshold where nobody exits agrees that much
    assert _best(curve, 0.05, 0.9) is None
    # with one standard error to spare, 99.5 % of 1,000 answers still clears 99 %; of 200 it does not
    assert _best(curve.assign(n=1000), None, 0.99, margin_se=1.0) == 0.9
    assert _best(curve.assign(n=200), None, 0.99, margin_se=1.0) is None
