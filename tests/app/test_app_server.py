"""``app.py`` as the server sees it: ``streamlit run app.py`` finds its ``st.App`` (whose start-up hook loads the
default model in a thread) without running the page code, and the warm-up fills the same process-wide cache entry
the first page reads, so no session builds a second copy."""
from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import streamlit as st

app_discovery = pytest.importorskip("streamlit.web.server.app_discovery",
                                    reason="this Streamlit has no st.App: app.py runs without the start-up warm-up")

from conftest import app_environment
from toys import SMALL_CIFAR_MODEL

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"


@pytest.fixture()
def app_env(tmp_path):
    env = {"SKIPVIZ_MODEL": SMALL_CIFAR_MODEL, "SKIPVIZ_DATA_DIR": str(tmp_path / "no_weights")}
    with app_environment(env) as e:
        yield e


def test_streamlit_run_finds_the_server_application():
    found = app_discovery.discover_asgi_app(APP)
    assert found.is_asgi_app and found.app_name == "app"


def test_importing_app_builds_the_server_application_without_running_a_page(app_env):
    """Imported (not run as ``__main__``), app.py only defines ``app``: no page, no model loaded yet."""
    from pages import _shared

    spec = importlib.util.spec_from_file_location("skipviz_app_under_test", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.app, st.App)
    name = _shared.default_model_name()
    calls = []
    original = _shared.dashboard.load_model
    try:
        _shared.dashboard.load_model = lambda n: calls.append(n) or original(n)
        module._warm()  # what the start-up hook runs in its thread
        lm = _shared.registry_model(name, _shared.dashboard.weights_state(name))
    finally:
        _shared.dashboard.load_model = original
    assert calls == [SMALL_CIFAR_MODEL]  # built once, by the warm-up; the page's call is a cache hit
    assert lm.net.meta.arch == "cifar_resnet20"


def test_start_up_hook_returns_at_once_and_warms_in_a_thread(app_env, monkeypatch):
    """The lifespan yields immediately (the server answers while the model loads) and starts the warm-up."""
    spec = importlib.util.spec_from_file_location("skipviz_app_under_test2", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    started = []
    monkeypatch.setattr(module, "_warm", lambda: (time.sleep(0.5), started.append(True)))

    async def enter() -> float:
        t0 = time.perf_counter()
        async with module._warm_on_start(None):
            return time.perf_counter() - t0

    assert asyncio.run(enter()) < 0.4
    deadline = time.time() + 5
    while not started and time.time() < deadline:
        time.sleep(0.05)
    assert started


def test_warm_up_says_when_the_model_is_ready(app_env):
    """The server's log line that benchmarks/first_prediction.py waits for, from a real process."""
    code = ("import sys; sys.path.insert(0, '.'); from pages import _shared; _shared.warm_default_model_logged()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    from pages._shared import READY_LINE

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert READY_LINE in proc.stderr
    assert "ScriptRunContext" not in proc.stderr
