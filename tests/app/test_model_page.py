"""The Model page's shipped-model switch: the ImageNet default and the CIFAR-10 model one click apart, with the
shipped weights from ``data/`` (no data sets needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from skipviz import CIFAR_MODEL, DEFAULT_MODEL

from conftest import app_environment

APP = str(Path(__file__).resolve().parents[2] / "app.py")


@pytest.fixture(scope="module")
def app_env():
    with app_environment({"SKIPVIZ_CIFAR10": "/nonexistent/cifar10", "SKIPVIZ_IMAGENETTE": "/nonexistent/imagenette",
                          "SKIPVIZ_CALIB_N": "8", "SKIPVIZ_LATENCY_REPEATS": "2"}, unset=("SKIPVIZ_MODEL",)) as env:
        yield env


def test_one_click_between_the_shipped_models(app_env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/model.py").run()
    assert not at.exception
    assert at.button(key=f"use_{DEFAULT_MODEL}").disabled  # the default is in use
    at.button(key=f"use_{CIFAR_MODEL}").click().run()
    assert not at.exception and at.session_state["sv_model_key"] == f"registry:{CIFAR_MODEL}"
    assert CIFAR_MODEL.partition(".")[0] in at.subheader[1].value
    at.button(key=f"use_{DEFAULT_MODEL}").click().run()
    assert not at.exception and at.session_state["sv_model_key"] == f"registry:{DEFAULT_MODEL}"


def test_blocks_without_a_bypass_cannot_be_forced_to_skip(app_env):
    from streamlit.testing.v1 import AppTest

    from skipviz import create_model

    net = create_model(DEFAULT_MODEL)
    fixed = next(i for i, b in enumerate(net.blocks) if not b.bypassable)
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/thresholds.py").run()
    assert not at.exception
    assert at.selectbox(key=f"override_{fixed}").options == ["auto", "run"]  # no "skip" offered
    assert any("cannot be forced to skip" in c.value for c in at.caption)
    at.session_state["sv_overrides"] = {fixed: "skip"}  # asked for anyway (e.g. a stale setting): refused
    at.run()
    assert not at.exception
    assert any("Override refused" in e.value and "no bypass" in e.value for e in at.error)
    assert at.session_state["sv_overrides"] == {}


def test_identical_weights_upload_keeps_the_registered_model_and_its_card(app_env):
    from streamlit.testing.v1 import AppTest

    from skipviz import list_pretrained

    shipped = next(w for w in list_pretrained() if w.name == CIFAR_MODEL)
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/model.py").run()
    at.selectbox(key="weights_arch").set_value(shipped.arch).run()
    at.file_uploader(key="weights_upload").set_value(("copy.safetensors", shipped.path.read_bytes(),
                                                       "application/octet-stream")).run()
    assert not at.exception
    assert at.session_state["sv_model_key"] == f"registry:{CIFAR_MODEL}"  # the registry model, card included
    assert any("byte-identical" in s.value for s in at.success)


def test_the_cards_operating_points_set_the_slider(app_env):
    """The shipped CIFAR model's card names fast and faithful points per decision source: a click moves the
    slider there, and the block table uses it. Its default source is the plan; the gates are one click away."""
    from streamlit.testing.v1 import AppTest

    from skipviz import create_model

    meta = create_model(CIFAR_MODEL).meta
    fast = next(p for p in meta.operating_point_records("gates") if p.name == "fast")
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.switch_page("pages/model.py").run()
    at.button(key=f"use_{CIFAR_MODEL}").click().run()
    at.switch_page("pages/inspect.py").run()
    assert meta.default_source() == "plan" and at.radio(key="inspect_source").value == "plan"
    assert at.slider(key="inspect_threshold_plan").value == pytest.approx(meta.default_threshold("plan"))
    at.radio(key="inspect_source").set_value("gates").run()
    at.slider(key="inspect_threshold").set_value(0.5).run()
    assert at.slider(key="inspect_threshold").value == 0.5
    at.button(key="inspect_threshold_op_fast").click().run()
    assert not at.exception
    assert at.slider(key="inspect_threshold").value == pytest.approx(fast.threshold)
    table = next(d.value for d in at.dataframe if "decision" in d.value.columns)
    assert list(table["threshold"].dropna().unique()) == pytest.approx([fast.threshold])
    assert at.session_state["sv_thresholds"]["gates"] == pytest.approx(fast.threshold)
