"""End to end in a real browser: Debian's Chromium driven by Playwright against ``streamlit run app.py``.

Uploads an image, moves the threshold from 0 to 1 with the keyboard, checks that the block map's bars changed
from all "fired" to some "bypassed", and saves screenshots under ``test-artifacts/``. Skipped when
``/usr/bin/chromium`` is absent (``.ci/run`` installs it with apt-get).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"{CHROMIUM} not installed (apt-get install chromium); browser test skipped")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = {**os.environ, "SKIPVIZ_CALIB_N": "32", "SKIPVIZ_LATENCY_REPEATS": "2",
           "SKIPVIZ_DATA_DIR": str(tmp_path_factory.mktemp("no_weights"))}  # documented fallback model
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                 "--server.port", str(port), "--server.address", "127.0.0.1",
                                 "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited: {log.read_text()[-2000:]}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


# the block map's bars are the only ones labelled "fired" / "bypassed"; read the first chart that has them (a page
# can hold a second, stale copy of a chart for a moment while a fragment re-renders)
BLOCK_TEXTS = ("(() => { for (const plot of document.querySelectorAll('.js-plotly-plot')) {"
               " const t = [...plot.querySelectorAll('text.bartext')].map(e => e.textContent)"
               ".filter(s => s.includes('fired') || s.includes('bypassed'));"
               " if (t.length) return t; } return []; })()")


def bar_texts(page) -> list[str]:
    return page.evaluate(f"() => {BLOCK_TEXTS}")


def test_upload_move_threshold_block_map_changes(server, tmp_path):
    from playwright.sync_api import sync_playwright

    arr = (np.random.default_rng(5).random((40, 40, 3)) * 255).astype(np.uint8)
    img = tmp_path / "upload.png"
    Image.fromarray(arr).save(img)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            t0 = time.time()
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_function(f"() => {BLOCK_TEXTS}.length > 0", timeout=180_000)
            first_prediction_s = time.time() - t0
            page.get_by_text("Upload", exact=True).click()
            page.locator("input[type=file]").set_input_files(str(img))
            page.get_by_text("upload.png:").first.wait_for(timeout=60_000)  # the image caption: it is in use
            slider = page.locator("[data-testid=stSlider] input[type=range]").first
            slider.focus()
            slider.press("Home")  # threshold 0: every block fires
            page.wait_for_function(f"() => {{ const t = {BLOCK_TEXTS}; return t.length > 0 && "
                                   "t.every(s => s.includes('fired')); }", timeout=60_000)
            before = bar_texts(page)
            page.screenshot(path=str(ARTIFACTS / "e2e_inspect_threshold_0.png"), full_page=True)
            slider.focus()
            slider.press("End")  # threshold 1: gated blocks are bypassed
            page.wait_for_function(f"() => {BLOCK_TEXTS}.some(s => s.includes('bypassed'))", timeout=60_000)
            after = bar_texts(page)
            page.screenshot(path=str(ARTIFACTS / "e2e_inspect_threshold_1.png"), full_page=True)
            assert page.locator("[data-testid=stException]").count() == 0
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "e2e_failure.png"), full_page=True)
            (ARTIFACTS / "e2e_failure.txt").write_text(page.inner_text("body"))
            raise
        finally:
            browser.close()
    from skipviz import DEFAULT_MODEL, create_model

    assert len(before) == len(after) == create_model(DEFAULT_MODEL).num_blocks  # one bar per block
    assert all("fired" in t for t in before)
    assert any("bypassed" in t for t in after) and before != after
    assert (ARTIFACTS / "e2e_inspect_threshold_1.png").stat().st_size > 10_000
    print(f"first block map after page load: {first_prediction_s:.1f} s")
