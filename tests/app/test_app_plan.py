"""The dashboard with the shipped default model, which carries a plan head: the decision source can be switched
between per-block gates and the plan at the stem, and the rendered decisions follow the engine."""
from __future__ import annotations

import pytest
import torch

from skipviz import FullPolicy, GatePolicy, PlanPolicy, load_image, dashboard, figures, policies
from skipviz.evaluate import calibration
from skipviz.samples import sample_bytes, sample_names

from conftest import app_environment
from test_app import APP, frame, metric
from toys import SMALL_CIFAR_MODEL, FakeClock

ENV = {"SKIPVIZ_CIFAR10": "/nonexistent/cifar10", "SKIPVIZ_CALIB_N": "16", "SKIPVIZ_LATENCY_REPEATS": "3",
       "SKIPVIZ_MODEL": SMALL_CIFAR_MODEL}


@pytest.fixture(scope="module")
def shipped_env():
    """The weights shipped in data/, timed on a fake clock (tests/toys.FakeClock): no real timing in the pages."""
    with app_environment(ENV, unset=("SKIPVIZ_DATA_DIR",)), pytest.MonkeyPatch.context() as mp:
        FakeClock(full_s=2e-3, saving_s=5e-4, spread_s=1e-6, seed=0).install(mp)
        FakeClock.quiet(mp)
        yield


def decisions(net, policy) -> list[str]:
    image, _ = load_image(sample_bytes(sample_names()[0]))
    with torch.no_grad():
        ex = net.run(dashboard.preprocess(net, image), policy).executed[0]
    return ["fired" if e else "bypassed" for e in ex.tolist()]


def test_views_offer_the_plan_when_the_model_has_one():
    net = dashboard.load_model(SMALL_CIFAR_MODEL).net
    assert dashboard.decision_sources(net) == ["gates", "plan", "early_exit"]
    lm = dashboard.load_model(SMALL_CIFAR_MODEL)
    assert lm.default_threshold_for("plan") == net.meta.card["plan"]["default_threshold"]
    assert lm.default_threshold_for("gates") == lm.default_threshold == net.meta.card["default_policy"]["threshold"]
    assert isinstance(policies.make_policy(net, 0.5, {1: "skip"}, "plan"), PlanPolicy)
    assert isinstance(policies.make_policy(net, 0.5), GatePolicy)
    with pytest.raises(ValueError, match="decision source"):
        policies.make_policy(net, 0.5, source="oracle")


def test_inspect_switches_to_the_plan(shipped_env):
    from streamlit.testing.v1 import AppTest

    net = dashboard.load_model(SMALL_CIFAR_MODEL).net
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and at.radio(key="inspect_source").value == net.meta.default_source() == "plan"
    at.radio(key="inspect_source").set_value("gates").run()  # the card recommends the plan: its gates pay nothing
    at.slider(key="inspect_threshold").set_value(0.5).run()
    assert list(frame(at, "blocks")["decision"]) == decisions(net, GatePolicy(0.5))
    at.radio(key="inspect_source").set_value("plan").run()
    assert not at.exception
    plan_default = net.meta.card["plan"]["default_threshold"]
    assert at.slider(key="inspect_threshold_plan").value == plan_default  # the plan's own operating point
    table = frame(at, "blocks")
    assert list(table["decision"]) == decisions(net, PlanPolicy(plan_default))
    at.slider(key="inspect_threshold_plan").set_value(0.5).run()
    table = frame(at, "blocks")
    assert list(table["decision"]) == decisions(net, PlanPolicy(0.5))
    assert any("decided at the stem" in r for r in table["reason"])
    assert metric(at, "Blocks fired").endswith(f"/{net.num_blocks}")
    at.switch_page("pages/thresholds.py").run()  # the choice and the threshold hold on the Thresholds page
    assert not at.exception and at.radio(key="thresholds_source").value == "plan"
    assert at.slider(key="thresholds_threshold_plan").value == 0.5
    at.switch_page("pages/redundancy.py").run()  # its comparison row is the session's policy, not the gates
    assert not at.exception
    table = [d.value for d in at.dataframe if "agreement with full" in d.value.columns][0]
    row = table[table["policy"].str.startswith(policies.DECISION_SOURCES["plan"].label)]
    assert list(row["policy"]) == [f"{policies.DECISION_SOURCES['plan'].label} (current threshold 0.50)"]
    calib = calibration.load_calibration(net, 16)
    expected = calibration.evaluate_calibration(net, calib, PlanPolicy(0.5))
    assert float(row["FLOPs cut"].iloc[0]) == pytest.approx(1.0 - expected.flops_fraction)


def test_plan_scores_are_labelled_as_plan_probabilities():
    from skipviz import PlanPolicy, create_model

    net = create_model(SMALL_CIFAR_MODEL)
    if net.plan_head is None:
        pytest.skip("the default model's weights (with a plan head) are not in data/")
    x = torch.zeros(1, 3, 32, 32)
    res = dashboard.inspect(net, x, PlanPolicy(0.5))
    assert "plan probability" in dashboard.block_table(res.trace).columns
    fig = figures.block_map_figure(res.trace)
    assert fig.layout.yaxis.title.text.startswith("plan probability")
    assert "blocks the plan decides" in [tr.name for tr in fig.data]
    gates = dashboard.inspect(net, x, policies.make_policy(net, 0.5))
    assert "gate probability" in dashboard.block_table(gates.trace).columns


def slider_in_use(at, page: str):
    """The page's one threshold slider (a widget per decision source: exactly one is drawn)."""
    sliders = [s for s in at.slider if str(s.key).startswith(f"{page}_threshold")]
    assert len(sliders) == 1, [s.key for s in sliders]
    return sliders[0]


def test_the_slider_shows_the_threshold_in_use_after_every_switch(shipped_env):
    """One threshold per decision source: each switch of source (or page) draws that source's slider, under a key
    of its own, at the value the table and the metrics use."""
    from streamlit.testing.v1 import AppTest

    net = dashboard.load_model(SMALL_CIFAR_MODEL).net
    plan_default = net.meta.card["plan"]["default_threshold"]
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.radio(key="inspect_source").set_value("gates").run()  # from the gates (the card recommends the plan)
    at.slider(key="inspect_threshold").set_value(0.3).run()
    at.radio(key="inspect_source").set_value("plan").run()
    s = slider_in_use(at, "inspect")
    assert s.key == "inspect_threshold_plan" and s.label == "Plan threshold" and s.value == plan_default
    table = frame(at, "blocks")
    assert set(table["threshold"].dropna()) == {plan_default}
    assert list(table["decision"]) == decisions(net, PlanPolicy(plan_default))
    at.slider(key="inspect_threshold_plan").set_value(0.6).run()
    at.radio(key="inspect_source").set_value("gates").run()  # back: the gates' own value, not the plan's
    s = slider_in_use(at, "inspect")
    assert s.key == "inspect_threshold" and s.label == "Gate threshold" and s.value == 0.3
    table = frame(at, "blocks")
    assert set(table["threshold"].dropna()) == {0.3}
    assert list(table["decision"]) == decisions(net, GatePolicy(0.3))
    at.switch_page("pages/thresholds.py").run()
    s = slider_in_use(at, "thresholds")
    assert s.label == "Gate threshold" and s.value == 0.3
    at.radio(key="thresholds_source").set_value("plan").run()
    s = slider_in_use(at, "thresholds")
    assert s.key == "thresholds_threshold_plan" and s.label == "Plan threshold" and s.value == 0.6
    calib = calibration.load_calibration(net, 16)
    full = calibration.evaluate_calibration(net, calib, FullPolicy())
    point = calibration.evaluate_calibration(net, calib, PlanPolicy(0.6), full.predictions)
    assert metric(at, "Agreement with full") == dashboard.percent(point.agreement)
    at.switch_page("pages/inspect.py").run()
    s = slider_in_use(at, "inspect")
    assert s.key == "inspect_threshold_plan" and s.value == 0.6
    assert set(frame(at, "blocks")["threshold"].dropna()) == {0.6}


def test_early_exits_are_a_decision_source_on_every_page(shipped_env):
    """The exits on the probe heads: their own slider (the card's default), the table's decisions and reasons from
    the engine, the same choice and value on the Thresholds page. The shipped ResNet-20's exits check nowhere (none
    saved time at batch 1: skipviz card-exits), so the exits are then checked after blocks 2 and 5 of its card."""
    from streamlit.testing.v1 import AppTest

    from skipviz import EarlyExitPolicy

    net = dashboard.load_model(SMALL_CIFAR_MODEL).net  # the app's cached network: its card is the app's
    default = net.meta.default_threshold("early_exit")
    assert net.meta.source_options("early_exit")["blocks"] == []
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.radio(key="inspect_source").set_value("early_exit").run()
    assert not at.exception
    s = slider_in_use(at, "inspect")
    assert s.key == "inspect_threshold_early_exit" and s.label == "Exit threshold" and s.value == default
    assert "leaves after a block" in s.help
    table = frame(at, "blocks")
    assert set(table["decision"]) == {"fired"} and set(table["reason"]) == {"runs: no exit after this block"}
    real = type(net.meta).source_options

    def exits_after_2_and_5(meta, source: str) -> dict:
        return {**real(meta, source), "blocks": [2, 5]} if source == "early_exit" else real(meta, source)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(net.meta), "source_options", exits_after_2_and_5)
        at.slider(key="inspect_threshold_early_exit").set_value(0.0).run()  # every input leaves at the first exit
        table = frame(at, "blocks")
        assert list(table["decision"]) == decisions(net, EarlyExitPolicy(0.0, blocks=[2, 5]))
        assert "exit after this block" in table["reason"].iloc[2]
        assert all("early exit" in r for r in table["reason"].iloc[3:])
        at.switch_page("pages/thresholds.py").run()
        assert not at.exception and at.radio(key="thresholds_source").value == "early_exit"
        assert slider_in_use(at, "thresholds").value == 0.0
        calib = calibration.load_calibration(net, 16)
        full = calibration.evaluate_calibration(net, calib, FullPolicy())
        point = calibration.evaluate_calibration(net, calib, EarlyExitPolicy(0.0, blocks=[2, 5]), full.predictions)
        assert metric(at, "Agreement with full") == dashboard.percent(point.agreement)