"""Early-exit operating points chosen on a validation split (skipviz.training.exit_points)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from skipviz.data import TensorDataset
from skipviz.evaluate import evaluate_policy
from skipviz.policies import EarlyExitPolicy, FullPolicy
from skipviz.engine.flops import FlopTable
from skipviz.measure.profile import DecisionCost
from skipviz.training.exit_points import (ExitPointsConfig, ProbeOutputs, choose_exit_blocks, exit_operating_points,
                                          probe_outputs, simulate_exits)


def _images(n: int, seed: int, labels: torch.Tensor | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = labels if labels is not None else torch.full((n,), -1, dtype=torch.long)
    return TensorDataset(images, y, [str(i) for i in range(10)], [f"{i}.png" for i in range(n)], "mem", "0" * 64)


def _check_cost(fraction: float) -> DecisionCost:
    return DecisionCost(checks=8, check_ms=fraction * 10.0, full_ms=10.0, rounds=3, batch_size=1, device="CPU")


@pytest.mark.parametrize("labelled", [True, False])
def test_points_follow_their_rules_on_validation_and_are_reported_on_test(tiny_net, labelled):
    val, test = _images(24, 1), _images(16, 2)
    if labelled:  # the full network's own answers as labels: its accuracy is 100 %
        val = _images(24, 1, torch.as_tensor(evaluate_policy(tiny_net, val, FullPolicy()).predictions))
    cfg = ExitPointsConfig(thresholds=(0.0, 0.3, 1.0), batch_size=8)
    val_ref = evaluate_policy(tiny_net, val, FullPolicy())
    test_ref = evaluate_policy(tiny_net, test, FullPolicy())
    out = exit_operating_points(tiny_net, val, val_ref, _check_cost(0.005), test, test_ref, cfg)
    assert out.choice[0]["blocks"] == list(range(tiny_net.num_blocks - 1))  # the elimination starts from all
    assert out.blocks == out.choice[-1]["blocks"] and set(out.blocks) <= set(out.choice[0]["blocks"])
    saved = [r["time_saved"] for r in out.choice]
    assert saved == sorted(saved)  # each step saves at least as much predicted time
    assert all(r == out.blocks for r in out.validation["blocks"]) and len(out.test) == 3
    never = out.validation[out.validation["threshold"] == 1.0].iloc[0]
    assert never["agreement_with_full"] == 1.0 and never["flops_saved_fraction"] <= 0.0  # probes cost, nobody left
    assert out.points["faithful"]["threshold"] != 1.0  # nobody exits there: the probes cost, nothing is cut
    for name, floor in (("fast", cfg.fast_min_agreement), ("faithful", cfg.min_agreement)):
        point = out.points[name]
        assert point["blocks"] == out.blocks and ("accuracy drop" in point["rule"]) == (labelled and name == "fast")
        if point["threshold"] is None:
            assert not point["rule_met_on_validation"] and point["test"] is None
            continue
        assert point["validation"]["agreement_with_full"] >= floor and point["validation"]["flops_saved_fraction"] > 0
        assert point["validation"]["time_saved_fraction_predicted"] > 0
        # the reported test row is what the policy gives when run again
        again = evaluate_policy(tiny_net, test, EarlyExitPolicy(point["threshold"], blocks=out.blocks))
        assert again.summary(test_ref)["flops_saved_fraction"] == pytest.approx(point["test"]["flops_saved_fraction"])
    section = out.card_section(cfg)
    faithful = out.points["faithful"]["threshold"]
    assert section["default_threshold"] == (faithful if faithful is not None else max(cfg.thresholds))
    some = faithful is not None or out.points["fast"]["threshold"] is not None
    assert section["blocks"] == (out.blocks if some else [])  # no point at all: the default checks nowhere
    assert section["time_model"]["check_cost"]["fraction"] == pytest.approx(0.005)


def test_exits_that_never_pay_leave_a_default_that_checks_nowhere(tiny_net):
    # random probes are never 99.9 % sure and a check costs half the run: no threshold saves time anywhere
    val, test = _images(16, 3), _images(8, 4)
    cfg = ExitPointsConfig(thresholds=(0.999,), batch_size=8)
    out = exit_operating_points(tiny_net, val, evaluate_policy(tiny_net, val, FullPolicy()), _check_cost(0.5), test,
                                evaluate_policy(tiny_net, test, FullPolicy()), cfg)
    assert out.points["fast"]["threshold"] is None and out.points["faithful"]["threshold"] is None
    section = out.card_section(cfg)
    assert section["blocks"] == [] and section["operating_point"] is None
    policy = EarlyExitPolicy(section["default_threshold"], blocks=section["blocks"])  # what policy_for builds
    assert not any(policy.exits_possible_after(tiny_net, i) for i in range(tiny_net.num_blocks))


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5])
def test_simulated_exits_are_what_the_engine_does(tiny_net, threshold):
    data = _images(20, 3)
    outputs = probe_outputs(tiny_net, data, batch_size=7)
    blocks = [1, 3, 4, 7]
    sim = simulate_exits(outputs, tiny_net.flop_table(), blocks, threshold)
    ref = evaluate_policy(tiny_net, data, FullPolicy())
    real = evaluate_policy(tiny_net, data, EarlyExitPolicy(threshold, blocks=blocks), batch_size=6)
    summary = real.summary(ref)
    for key in ("flops_mean", "flops_saved_fraction", "agreement_with_full"):
        assert sim[key] == pytest.approx(summary[key]), key
    left = real.executed.sum(1) < tiny_net.num_blocks
    assert ((sim["exit_block"].numpy() >= 0) == left).all()


def test_checks_that_cost_more_than_they_save_are_dropped():
    # 6 blocks, probes after 0..4: probe 0 never confident, probe 1 confident for everyone, the rest later
    n, L = 40, 6
    conf = torch.tensor([0.1, 0.95, 0.99, 0.99, 0.99, 0.0]).repeat(n, 1)
    pred = torch.zeros(n, L, dtype=torch.long)
    outputs = ProbeOutputs(conf, pred, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    table = FlopTable(input_hw=(32, 32), stem=10, blocks=[100] * L, bypass=[0] * L, head=10, probes=[1] * L)
    cfg = ExitPointsConfig(thresholds=(0.9,))
    free = choose_exit_blocks(outputs, table, 0.0, cfg, max_drop=1.0)
    # free checks: a check nobody leaves at costs nothing and is dropped all the same; everyone leaves after 1
    assert free[-1]["blocks"] == [1]
    costly = choose_exit_blocks(outputs, table, 0.05, cfg, max_drop=1.0)
    assert costly[-1]["blocks"] == [1] and costly[-1]["time_saved"] > costly[0]["time_saved"]
    row = simulate_exits(outputs, table, [1], 0.9, 0.05)
    # per input: stem 10 + blocks 0-1 (200) of 620 FLOPs, plus one check at 5 % of the full run
    assert row["time_saved_fraction"] == pytest.approx(1 - 210 / 620 - 0.05)
    assert row["flops_mean"] == 10 + 200 + 1 and (row["exit_block"] == 1).all()
    # threshold 0.99, checks after blocks 0 and 3: both passed, everyone leaves after block 3
    late = simulate_exits(outputs, table, [0, 3], 0.99, 0.05)
    assert (late["exit_block"] == 3).all() and late["time_saved_fraction"] == pytest.approx(1 - 410 / 620 - 0.1)


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
