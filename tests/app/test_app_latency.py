"""Honest latency on the pages when the machine is noisy: a fake clock (tests/toys.FakeClock) makes every timed
repeat's spread far wider than the saving, and the load average exceeds the core count. The Inspect and
Thresholds pages must then say "no measurable saving (±x ms)", never a saving or a slowdown as a fact, warn that
the timings are noisy, and keep naming the device and batch size."""
from __future__ import annotations

import re

import pytest


from conftest import app_environment
from test_app import APP
from toys import SMALL_CIFAR_MODEL, FakeClock

ENV = {"SKIPVIZ_CIFAR10": "/nonexistent/cifar10", "SKIPVIZ_CALIB_N": "16", "SKIPVIZ_LATENCY_REPEATS": "9",
       "SKIPVIZ_MODEL": SMALL_CIFAR_MODEL}
NUMBER_SAVED = re.compile(r"\d ms (saved|slower)")


@pytest.fixture(scope="module")
def app_env(tmp_path_factory):
    with app_environment({**ENV, "SKIPVIZ_DATA_DIR": str(tmp_path_factory.mktemp("no_weights"))}) as env:
        yield env


def new_app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=120)


def noisy_warnings(at) -> list[str]:
    return [w.value for w in at.warning if w.value.startswith("Timings are noisy")]


def test_inspect_says_no_measurable_saving_on_a_noisy_busy_machine(app_env, monkeypatch):
    # first a quiet machine with a clear saving: the page states it, with its interval
    FakeClock(full_s=2e-3, saving_s=6e-4, spread_s=1e-6, seed=0).install(monkeypatch)
    FakeClock.quiet(monkeypatch)
    at = new_app().run()
    assert not at.exception
    saved = [m for m in at.metric if m.label == "Latency saved"][0]
    assert saved.value == "0.60 ms saved" and saved.delta.startswith("95 % CI")
    assert not noisy_warnings(at)
    # then the machine gets noisy and busy: measured again, the page no longer states a saving
    FakeClock(full_s=2e-3, saving_s=5e-5, spread_s=8e-4, seed=1).install(monkeypatch)
    FakeClock.busy(monkeypatch, load=64.0)
    at.button(key="inspect_measure_again").click().run()
    assert not at.exception
    saved = [m for m in at.metric if m.label == "Latency saved"][0]
    assert ("on CPU" in saved.proto.help or "on GPU" in saved.proto.help) and "batch of 1," in saved.proto.help
    assert saved.value == "none measurable" and saved.delta.startswith("±") and "95 % CI contains 0" in saved.delta
    warning = noisy_warnings(at)
    assert len(warning) == 1 and "the machine is busy (load 64.0 on" in warning[0]
    assert "wider than the effect" in warning[0]
    charts = [c.proto.spec for c in at.get("plotly_chart") if "Latency, batch 1" in c.proto.spec]
    assert len(charts) == 1 and "no measurable saving" in charts[0]
    assert not NUMBER_SAVED.search(charts[0])
    assert not NUMBER_SAVED.search(saved.value + saved.delta)
    caption = " ".join(c.value for c in at.caption)
    assert "profile estimate" in caption and "interleaved paired rounds" in caption


def test_batch_size_is_selectable_and_named_on_the_page(app_env, monkeypatch):
    FakeClock(full_s=8e-3, saving_s=2e-3, spread_s=1e-6, seed=2).install(monkeypatch)
    FakeClock.quiet(monkeypatch)
    at = new_app().run()
    radio = at.radio(key="inspect_batch")
    assert list(radio.options) == ["1", "16", "64", "256"]
    radio.set_value(16).run()
    assert not at.exception
    saved = [m for m in at.metric if m.label == "Latency saved"][0]
    assert saved.proto.help.startswith("Per batch of 16,") and saved.value == "2.00 ms saved"
    blocks = [d.value for d in at.dataframe if "decision" in d.value.columns][0]
    assert [c for c in blocks.columns if c.startswith("profile estimate (ms per batch of 16, ")]
    assert any("this image and 15 calibration images" in c.value for c in at.caption)


def test_thresholds_page_on_a_noisy_machine(app_env, monkeypatch):
    FakeClock(full_s=2e-3, saving_s=2e-5, spread_s=8e-4, seed=3).install(monkeypatch)
    FakeClock.busy(monkeypatch, load=64.0)
    at = new_app().run()
    at.switch_page("pages/thresholds.py").run()
    at.radio(key="thresholds_batch").set_value(16).run()  # not measured before in this process
    assert not at.exception
    saved = [m for m in at.metric if m.label == "Latency saved per image"][0]
    assert "batches of 16" in saved.proto.help and ("CPU" in saved.proto.help or "GPU" in saved.proto.help)
    assert saved.value == "none measurable"
    warning = noisy_warnings(at)
    assert len(warning) == 1 and "busy (load 64.0" in warning[0] and "settings the spread" in warning[0]
    summary = [d.value for d in at.dataframe if "run" in d.value.columns][0]
    assert summary["latency saving"].iloc[0].startswith("no measurable saving (±")
    pareto = [c for c in at.get("plotly_chart") if "hollow: no measurable saving" in c.proto.spec][0]
    assert '"error_x"' in pareto.proto.spec and "circle-open" in pareto.proto.spec
