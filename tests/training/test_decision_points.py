"""The gates' and the plan's operating points priced with their decisions' measured cost
(:mod:`skipviz.training.decision_points`)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from skipviz import create_model
from skipviz.measure.profile import DecisionCost
from skipviz.training.decision_points import (add_exit_points, decision_defaults, decision_time_saved,
                                             reprice_decisions, threshold_points, veto_unpaid_defaults)
from skipviz.training.distill_export import HeadsExportConfig


def _cost(checks: int, fraction: float, source: str) -> DecisionCost:
    return DecisionCost(checks=checks, check_ms=fraction * 10.0, full_ms=10.0, rounds=3, batch_size=1, device="CPU",
                        source=source)


def _curve(cuts: list[float], drops: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"threshold": [0.05, 0.1, 0.2][:len(cuts)], "flops_saved_fraction": cuts,
                         "accuracy_drop_points": drops, "agreement_with_full": [0.99] * len(cuts),
                         "n": [1000] * len(cuts)})


def test_a_point_whose_decisions_cost_more_than_it_cuts_is_no_operating_point():
    # the shipped EfficientNet-Lite0 before: its one threshold within a point cut 1.3 % of FLOPs, its nine
    # gates cost 3 % of a batch-1 run (0.36 ms), so the gates' default ran slower than the full network
    val = {"gates": _curve([0.013, 0.04, 0.09], [0.7, 2.6, 4.0]), "plan": _curve([0.012, 0.05], [0.8, 1.5])}
    costs = {"gates": _cost(9, 0.0037, "gates"), "plan": _cost(1, 0.004, "plan")}
    points = threshold_points(val, None, HeadsExportConfig(), True, costs)
    assert points["gates"]["fast"]["threshold"] is None
    assert points["plan"]["fast"]["threshold"] == 0.05  # 1.2 % cut less one 0.4 % decision: it pays
    assert points["plan"]["fast"]["validation"]["time_saved_fraction_predicted"] == pytest.approx(0.008)
    assert list(val["gates"]["time_saved_fraction_predicted"]) == pytest.approx([0.013 - 9 * 0.0037, 0.04 - 0.0333,
                                                                                 0.09 - 0.0333])
    gates, plan = decision_defaults(points, costs, HeadsExportConfig(), True)
    assert gates["threshold"] == 0.0 and gates["operating_point"] is None and gates["name"] == "gates"
    assert "threshold 0, at which no head is evaluated" in gates["rule"]
    assert gates["time_model"]["decision_cost"]["checks"] == 9
    assert plan["default_threshold"] == 0.05 and plan["time_model"]["decision_cost"]["source"] == "plan"
    # cheaper gates: the largest cut within the accuracy rule again
    cheap = threshold_points(val, None, HeadsExportConfig(), True, {**costs, "gates": _cost(9, 0.0001, "gates")})
    assert cheap["gates"]["fast"]["threshold"] == 0.05
    assert decision_time_saved(val["gates"], _cost(2, 0.01, "gates")).tolist() == pytest.approx([-0.007, 0.02, 0.07])


def test_a_shipped_card_is_repriced_from_its_own_curves(tmp_path, monkeypatch):
    import skipviz.training.decision_points as decision_points

    net = create_model("cifar_resnet20", plan=True).eval()
    timed = []

    def fake_cost(net_, x, source, rounds):  # decision_cost itself: tests/measure/test_timing.py
        timed.append((net_, tuple(x.shape), source, rounds))
        return _cost(len(net.gated_blocks) if source == "gates" else 1, 0.01 if source == "gates" else 0.5, source)

    monkeypatch.setattr(decision_points, "decision_cost", fake_cost)
    rows = _curve([0.013, 0.3], [0.5, 0.9]).to_dict("records")
    card = {"name": "toy.gated", "backbone": {"file": "toy.pth"},
            "default_policy": {"name": "gates", "threshold": 0.05, "operating_point": "fast"},
            "operating_points": {"gates": {}, "plan": {}, "early_exit": {"faithful": {"threshold": 0.9}}},
            "metrics_validation": {"full_accuracy": 0.7, "gate_curve": rows},
            "metrics_test": {"gate_curve": rows, "blocks_mean_correct": 8.5},
            "plan": {"default_threshold": 0.05, "validation": {"curve": rows}, "curve_test": rows}}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(card))
    out = reprice_decisions(net, path, HeadsExportConfig(check_cost_inputs=2, check_cost_rounds=2))
    assert [(t[1], t[2], t[3]) for t in timed] == [((2, 3, 32, 32), "gates", 2), ((2, 3, 32, 32), "plan", 2)]
    assert json.loads(path.read_text()) == out
    assert out["metrics_test"]["outcome_threshold"] == 0.05  # the outcome tables keep the threshold they had
    assert out["default_policy"]["time_model"]["decision_cost"]["checks"] == len(net.gated_blocks)
    # gates: 30 % cut less 7 x 1 % pays; the plan head at half a run pays at neither threshold
    assert out["operating_points"]["gates"]["fast"]["threshold"] == 0.1 == out["default_policy"]["threshold"]
    assert out["operating_points"]["plan"]["fast"]["threshold"] is None and out["plan"]["default_threshold"] == 0.0
    assert out["operating_points"]["plan"]["fast"]["validation"] is None
    assert out["plan"]["validation"]["curve"][1]["time_saved_fraction_predicted"] == pytest.approx(-0.2)
    assert out["operating_points"]["early_exit"] == {"faithful": {"threshold": 0.9}}  # exits untouched
    assert out["repriced"]["reproduce"] == "skipviz reprice-card --model toy.gated"
    assert out["default_source"] == "gates"  # recomputed: the exits' faithful point here has no validation record
    # a card with the plan's test curve only: the gates' points get no test record, the plan's do
    del card["metrics_test"]["gate_curve"]
    path.write_text(json.dumps(card))
    out = reprice_decisions(net, path, HeadsExportConfig(check_cost_inputs=2, check_cost_rounds=2))
    assert out["operating_points"]["gates"]["fast"]["test"] is None
    assert "time_saved_fraction_predicted" in out["plan"]["curve_test"][0]


def test_only_a_card_with_its_curves_is_repriced_and_a_cifar_card_keeps_its_rules(tmp_path, monkeypatch):
    import skipviz.training.decision_points as decision_points

    net = create_model("cifar_resnet20", plan=True).eval()
    rows = _curve([0.013, 0.3], [0.5, 0.9]).to_dict("records")
    cifar = {"name": "c", "source": {"file": "resnet20.th"}, "metrics_validation": {"gate_curve": rows},
             "default_policy": {"name": "gates", "threshold": 0.05},
             "plan": {"default_threshold": 0.1, "validation": {"curve": rows}}}
    for card, message in (({**cifar, "backbone": {}, "plan": {}}, "no validation curve for plan"),
                          ({**cifar, "backbone": {}, "metrics_validation": {"gate_curve": [{"threshold": 0.1}]}},
                           "gates validation curve lacks")):
        path = tmp_path / "card.json"
        path.write_text(json.dumps(card))
        with pytest.raises(ValueError, match=message):
            reprice_decisions(net, path)
        assert json.loads(path.read_text()) == card  # refused before anything is timed or written
    # a CIFAR card: its thresholds are not chosen again, a default that does not pay is set to 0
    monkeypatch.setattr(decision_points, "decision_cost", lambda net_, x, source, rounds: _cost(7, 0.01, source))
    path.write_text(json.dumps(cifar))
    out = reprice_decisions(net, path, HeadsExportConfig(check_cost_inputs=2, check_cost_rounds=2))
    assert out["default_policy"]["threshold"] == 0.0 and out["default_policy"]["vetoed"]["threshold"] == 0.05
    assert out["plan"]["default_threshold"] == 0.1 and "vetoed" in out["repriced"]["what"]
    assert json.loads(path.read_text()) == out and "operating_points" not in out


def test_a_card_without_exits_gains_them_chosen_on_its_own_splits(tiny_net, monkeypatch):
    import skipviz.training.decision_points as decision_points
    from skipviz.training.exit_points import ExitPointsConfig

    from test_exit_points import _images

    monkeypatch.setattr(decision_points, "decision_cost", lambda net, x, source, rounds: _cost(8, 0.001, source))
    val, test = _images(16, 5), _images(8, 6)
    card = {"name": "toy", "operating_points": {"gates": {"fast": {"threshold": 0.1}}},
            "metrics_validation": {"gate_curve": []}, "metrics_test": {"gate_curve": []}}
    cfg = ExitPointsConfig(thresholds=(0.0, 0.5), batch_size=8, max_drop_points=0.5)
    out = add_exit_points(tiny_net, card, val, test, cfg, HeadsExportConfig(check_cost_inputs=2, check_cost_rounds=2))
    assert out is card and out["operating_points"]["gates"] == {"fast": {"threshold": 0.1}}  # the rest untouched
    section, points = out["early_exit"], out["operating_points"]["early_exit"]
    assert section["time_model"]["check_cost"]["source"] == "early_exit"
    assert set(points) == {"fast", "faithful"} and all(p["blocks"] == section["blocks_choice"][-1]["blocks"]
                                                          for p in points.values())
    assert [r["threshold"] for r in out["metrics_test"]["early_exit_curve"]] == [0.0, 0.5]
    assert len(out["metrics_validation"]["early_exit_curve"]) == 2



def test_batch1_saving_times_the_policy_against_the_full_network_photo_by_photo(tiny_net):
    from skipviz.policies import EarlyExitPolicy
    from skipviz.training.decision_points import batch1_saving

    from conftest import varied_images

    out = batch1_saving(tiny_net, EarlyExitPolicy(0.0, blocks=[0]), varied_images(3, seed=2), rounds=2)
    assert (out["images"], out["rounds"]) == (3, 2) and out["full_ms"] > 0
    assert out["saved_interval"][0] <= out["saved_fraction"] <= out["saved_interval"][1]
    assert out["device"].startswith("CPU") and out["device_name"]


@pytest.mark.parametrize("saved", [0.05, -0.01])
def test_an_exit_default_measured_slower_than_full_at_batch_one_is_withdrawn(tiny_net, monkeypatch, saved):
    import skipviz.training.decision_points as decision_points
    from skipviz.evaluate import evaluate_policy
    from skipviz.policies import FullPolicy
    from skipviz.training.exit_points import ExitPointsConfig, exit_operating_points

    from test_exit_points import _images

    val = _images(16, 7)
    cfg = ExitPointsConfig(thresholds=(0.0, 0.5), batch_size=8)
    exits = exit_operating_points(tiny_net, val, evaluate_policy(tiny_net, val, FullPolicy()),
                                  _cost(8, 0.0001, "early_exit"), None, None, cfg)
    assert exits.blocks and exits.points["fast"]["threshold"] is not None  # cheap checks: points found
    timed = []
    monkeypatch.setattr(decision_points, "batch1_saving",
                        lambda net, policy, x, rounds: timed.append((sorted(policy.blocks), policy.threshold, x.shape))
                        or {"saved_fraction": saved, "saved_interval": [saved - 0.01, saved + 0.01]})
    section, points = decision_points.exit_card_entries(tiny_net, exits, cfg, val, images=4)
    assert timed == [(exits.blocks, section["default_threshold"], (4, 3, 32, 32))]
    assert section["batch1_check"]["saved_fraction"] == saved
    if saved > 0:
        assert section["blocks"] == exits.blocks and points == exits.points
    else:  # the default checks nowhere, and no point is offered
        assert section["blocks"] == [] and section["operating_point"] is None
        assert all(p["threshold"] is None and "withdrawn" in p["rule"] for p in points.values())
        assert exits.points["fast"]["threshold"] is not None  # the chosen exits themselves are left as they were


@pytest.mark.parametrize("gate_cost, plan_cost", [(0.01, 0.01), (0.05, 0.01), (0.05, 0.5)])
def test_a_cifar_cards_default_that_does_not_pay_is_set_to_zero(gate_cost, plan_cost):
    rows = _curve([0.013, 0.3], [0.5, 0.9]).to_dict("records")  # thresholds 0.05 and 0.1
    card = {"default_policy": {"name": "gates", "threshold": 0.1},
            "metrics_validation": {"gate_curve": rows},
            "plan": {"default_threshold": 0.1, "validation": {"curve": rows}}}
    out = veto_unpaid_defaults(card, {"gates": _cost(7, gate_cost, "gates"), "plan": _cost(1, plan_cost, "plan")})
    gates_pay, plan_pays = 0.3 > 7 * gate_cost, 0.3 > plan_cost
    assert out["default_policy"]["threshold"] == (0.1 if gates_pay else 0.0)
    assert out["plan"]["default_threshold"] == (0.1 if plan_pays else 0.0)
    assert ("vetoed" in out["default_policy"]) == (not gates_pay) and ("vetoed" in out["plan"]) == (not plan_pays)
    assert out["default_policy"]["time_model"]["predicted_time_saved_at_default"] == pytest.approx(0.3 - 7 * gate_cost)
    # a card recommending the gates (by default) recommends the plan once only the plan pays
    assert out.get("default_source", "gates") == ("plan" if not gates_pay and plan_pays else "gates")
    with pytest.raises(ValueError, match="not on the card's validation curve"):
        veto_unpaid_defaults({**card, "default_policy": {"threshold": 0.7}}, {"gates": _cost(7, 0.01, "gates"),
                                                                              "plan": _cost(1, 0.01, "plan")})

