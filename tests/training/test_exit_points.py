"""Early-exit operating points chosen on a validation split (skipviz.training.exit_points)."""
from __future__ import annotations

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
    faithful = out.points["faithful"]
    assert faithful["threshold"] is not None and faithful["validation"]["agreement_with_full"] >= 0.99
    assert faithful["test"]["threshold"] == faithful["threshold"] and faithful["min_block"] == out.min_block
    fast = out.points["fast"]
    if fast["threshold"] is not None:
        assert fast["validation"]["agreement_with_full"] >= cfg.fast_min_agreement
        assert ("accuracy drop" in fast["rule"]) == labelled
    # the reported row is what the policy gives when run again
    again = evaluate_policy(tiny_net, test, EarlyExitPolicy(faithful["threshold"], min_block=out.min_block))
    assert again.summary(test_ref)["agreement_with_full"] == pytest.approx(faithful["test"]["agreement_with_full"])
    section = out.card_section(cfg)
    assert section["default_threshold"] == faithful["threshold"] and section["min_block"] == out.min_block
    best = max(out.choice, key=lambda r: r["fast_flops_saved"] + r["faithful_flops_saved"])
    assert best["fast_flops_saved"] + best["faithful_flops_saved"] == pytest.approx(
        next(r for r in out.choice if r["min_block"] == out.min_block)["fast_flops_saved"]
        + next(r for r in out.choice if r["min_block"] == out.min_block)["faithful_flops_saved"])
