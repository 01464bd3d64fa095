"""The Model page takes a timm model name for the weights upload (issue 21): the name is shown with what is
supported, and the current model's timm name is filled in."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import app_environment
from toys import SMALL_CIFAR_MODEL

APP = str(Path(__file__).resolve().parents[2] / "app.py")


@pytest.fixture(scope="module")
def app_env():
    with app_environment({"SKIPVIZ_MODEL": SMALL_CIFAR_MODEL, "SKIPVIZ_CIFAR10": "/nonexistent/cifar10",
                          "SKIPVIZ_IMAGENETTE": "/nonexistent/imagenette", "SKIPVIZ_CALIB_N": "8",
                          "SKIPVIZ_LATENCY_REPEATS": "2"}) as env:
        yield env


def test_a_timm_name_for_the_upload(app_env):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("pages/model.py").run()
    assert not at.exception and at.text_input(key="weights_timm").value == ""
    at.text_input(key="weights_timm").input("resnet50").run()
    assert not at.exception
    caption = " ".join(c.value for c in at.caption)
    assert "Loading into timm:resnet50" in caption and "ConvNeXt" in caption and "Vision Transformer" in caption
