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
