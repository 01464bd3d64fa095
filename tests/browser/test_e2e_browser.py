"""End to end in a real browser: Debian's Chromium driven by Playwright against ``streamlit run app.py``.

* With the fallback model: uploads an image, moves the threshold from 0 to 1 with the keyboard, checks that the
  block map's bars changed from all "fired" to some "bypassed".
* With the shipped weights: picks the CIFAR model (it has a plan head) on the Model page, switches the decision
  source gates <-> plan on Inspect and reads the slider's shown value against the block table's thresholds and
  decisions after every switch, after an arrow key and after a visit to the Thresholds page (its block map's
  threshold line); then audits a batch and reads the Audit page's summary and column order.

Screenshots of Inspect, Thresholds and Audit at 1280 and 1920 px wide go to ``test-artifacts/`` (git-ignored).
Skipped when ``/usr/bin/chromium`` is absent (``.ci/run`` installs it with apt-get).
"""
from __future__ import annotations

import contextlib
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


def serve(env: dict, log: Path):
    """``streamlit run app.py`` on a free port under ``env``; yields its URL, stops it afterwards."""
    port = free_port()
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**os.environ, "SKIPVIZ_CALIB_N": "32", "SKIPVIZ_LATENCY_REPEATS": "2",
           "SKIPVIZ_DATA_DIR": str(tmp_path_factory.mktemp("no_weights"))}  # documented fallback model
    yield from serve(env, tmp_path_factory.mktemp("streamlit") / "server.log")


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    """The app with the weights shipped in data/ (the default model first; the test picks the CIFAR model, which
    has a plan head, on the Model page) and a small calibration set."""
    env = {k: v for k, v in os.environ.items() if k not in ("SKIPVIZ_DATA_DIR", "SKIPVIZ_MODEL")}
    env.update({"SKIPVIZ_CALIB_N": "32", "SKIPVIZ_LATENCY_REPEATS": "2",
                "SKIPVIZ_AUDIT_DIR": str(tmp_path_factory.mktemp("audits"))})
    yield from serve(env, tmp_path_factory.mktemp("streamlit_shipped") / "server.log")


@contextlib.contextmanager
def chromium_page(p, failure: str, width: int = 1400, height: int = 1600):
    """A page in Debian's Chromium; on a failure, the page's screenshot and text as test-artifacts/<failure>.*"""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        yield page
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"{failure}.png"), full_page=True)
        (ARTIFACTS / f"{failure}.txt").write_text(page.inner_text("body"))
        raise
    finally:
        browser.close()


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
        with chromium_page(p, "e2e_failure") as page:
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
    from skipviz import DEFAULT_MODEL, create_model

    assert len(before) == len(after) == create_model(DEFAULT_MODEL).num_blocks  # one bar per block
    assert all("fired" in t for t in before)
    assert any("bypassed" in t for t in after) and before != after
    assert (ARTIFACTS / "e2e_inspect_threshold_1.png").stat().st_size > 10_000
    print(f"first block map after page load: {first_prediction_s:.1f} s")


# ------------------------------------------------------------------------------------------- shipped weights
WIDTHS = (1280, 1920)
# the page is idle: no script running, no element left stale from the previous run
IDLE = ("() => !document.querySelector('[data-testid=stStatusWidget] button, [data-testid=stSpinner], "
        "[data-testid=stProgress], [data-stale=true]')")
# the threshold slider (one per page): its label and the value it shows
SLIDER = ("() => { const s = document.querySelector('[data-testid=stSlider]'); if (!s) return null;"
          " const v = s.querySelector('[data-testid=stSliderThumbValue]');"
          " return {label: s.querySelector('[data-testid=stWidgetLabel]').textContent, value: v && v.textContent}; }")
# every st.dataframe as its accessible grid (the canvas grid keeps one for screen readers): headers and cells
TABLES = ("() => [...document.querySelectorAll('[data-testid=stDataFrame]')].map(df => {"
          " const t = df.querySelector('table[role=grid]'); if (!t) return null;"
          " return {head: [...t.querySelectorAll('th[role=columnheader]')].map(e => e.textContent),"
          " rows: [...t.querySelectorAll('tbody tr')].map(r => [...r.querySelectorAll('td')].map(e => e.textContent))};"
          " }).filter(t => t)")
# scroll every grid sideways (LEFT: the new scrollLeft): it draws only the columns in view
SCROLL_GRIDS = ("() => { for (const s of document.querySelectorAll('[data-testid=stDataFrame] .dvn-scroller'))"
                " s.scrollLeft = LEFT; }")
# the block map's threshold line (Thresholds page), from Plotly's own data
PLOT_THRESHOLDS = ("() => { for (const p of document.querySelectorAll('.js-plotly-plot')) {"
                   " const t = (p.data || []).find(d => d.name === 'threshold'); if (t) return t.y; } return null; }")


def settle(page, timeout_s: float = 240) -> None:
    """Wait until the app has been idle for two seconds."""
    deadline, quiet = time.time() + timeout_s, 0
    while time.time() < deadline:
        quiet = quiet + 1 if page.evaluate(IDLE) else 0
        if quiet >= 4:
            return
        time.sleep(0.5)
    raise AssertionError("the page did not settle")


def table_with(page, column: str) -> dict:
    return next(t for t in page.evaluate(TABLES) if column in t["head"])


def shoot(page, name: str) -> None:
    """Screenshots of the whole page at every width of WIDTHS (the page scrolls inside its main element, so the
    viewport is made as tall as the content), then back to 1280 x 900."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        time.sleep(1)
        settle(page)
        height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
        page.set_viewport_size({"width": width, "height": max(900, int(height))})
        time.sleep(1.5)
        page.screenshot(path=str(ARTIFACTS / f"{name}_{width}.png"))
    page.set_viewport_size({"width": 1280, "height": 900})
    time.sleep(1)


HEADINGS = {"Inspect": "Inspect one input", "Thresholds": "Tune thresholds", "Audit": "Audit a batch", "Model": "Model"}


def go(page, title: str) -> None:
    """Another page through the sidebar (a new URL would be a new session, without the model picked)."""
    page.locator("[data-testid=stSidebarNav] a", has_text=title).first.click()
    page.wait_for_function(f"() => [...document.querySelectorAll('h1')].some(h => h.textContent.includes("
                           f"{HEADINGS[title]!r}))", timeout=60_000)
    settle(page)


def shown_threshold(page, label: str) -> float:
    """The slider's shown value once it is the ``label`` slider (a switch of source draws another one)."""
    page.wait_for_function(f"() => {{ const s = ({SLIDER})(); return s && s.label.includes({label!r}); }}",
                           timeout=60_000)
    settle(page)
    return float(page.evaluate(f"() => ({SLIDER})()")["value"])


def assert_table_uses(page, shown: float, score: str, n_blocks: int) -> list[str]:
    """The block table uses the shown threshold: every block with a score has it as its threshold, and fired
    exactly when its score reaches it. Returns the decisions."""
    table = table_with(page, "decision")
    head = table["head"]
    assert score in head, head  # "gate p" or "plan p": the source the slider belongs to
    rows = [dict(zip(head, r)) for r in table["rows"]]
    scored = [r for r in rows if r[score]]
    assert len(rows) == n_blocks and scored
    for r in scored:
        assert float(r["threshold"]) == pytest.approx(shown), (shown, r)
        assert (r["decision"] == "fired") == (float(r[score]) >= shown - 1e-9), (shown, r)
    return [r["decision"] for r in rows]


def audit_inputs(folder: Path) -> list[Path]:
    from skipviz.samples import sample_bytes, sample_names

    paths = []
    for i, name in enumerate(sample_names()):
        paths.append(folder / f"sample{i}.png")
        Image.open(__import__("io").BytesIO(sample_bytes(name))).convert("RGB").save(paths[-1])
    rng = np.random.default_rng(11)
    for i in range(8):
        paths.append(folder / f"noise{i}.png")
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(paths[-1])
    paths.append(folder / "broken.png")
    paths[-1].write_bytes(b"not an image at all")
    return paths


def test_the_slider_and_the_block_table_agree_across_sources_and_pages(shipped_server, tmp_path):
    from playwright.sync_api import sync_playwright

    from skipviz import CIFAR_MODEL, dashboard

    lm = dashboard.load_model(CIFAR_MODEL)
    gates, plan = lm.default_threshold_for("gates"), lm.default_threshold_for("plan")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        with chromium_page(p, "e2e_shipped_failure", 1280, 900) as page:
            page.goto(shipped_server, wait_until="domcontentloaded")
            # the app's own navigation (app.py has run: its sidebar names the device), then its Model page
            page.locator("[data-testid=stSidebar]", has_text="Device:").wait_for(timeout=180_000)
            go(page, "Model")
            depth = CIFAR_MODEL.partition(".")[0].removeprefix("cifar_resnet")
            page.get_by_role("button", name=f"ResNet-{depth}").first.click(timeout=180_000)
            page.locator("[data-testid=stSidebar]", has_text=CIFAR_MODEL).wait_for(timeout=120_000)  # in use
            go(page, "Inspect")
            # the card's default source (the plan) at its operating point, then the gates at theirs
            assert lm.net.meta.default_source() == "plan"
            assert shown_threshold(page, "Plan threshold") == pytest.approx(plan)
            assert_table_uses(page, plan, "plan p", lm.net.num_blocks)
            page.get_by_text("per-block gates").first.click()
            assert shown_threshold(page, "Gate threshold") == pytest.approx(gates)
            assert_table_uses(page, gates, "gate p", lm.net.num_blocks)
            page.get_by_text("plan at the stem").first.click()
            assert shown_threshold(page, "Plan threshold") == pytest.approx(plan)
            slider = page.locator("[data-testid=stSlider] input[type=range]").first
            slider.focus()
            slider.press("ArrowRight")  # the next step is taken from the value shown
            page.wait_for_function(f"() => ({SLIDER})().value === {f'{plan + 0.05:.2f}'!r}", timeout=60_000)
            moved = shown_threshold(page, "Plan threshold")
            assert moved == pytest.approx(plan + 0.05)
            assert_table_uses(page, moved, "plan p", lm.net.num_blocks)
            page.get_by_text("per-block gates").first.click()  # back: the gates keep their own threshold
            assert shown_threshold(page, "Gate threshold") == pytest.approx(gates)
            assert_table_uses(page, gates, "gate p", lm.net.num_blocks)
            page.get_by_text("plan at the stem").first.click()
            assert shown_threshold(page, "Plan threshold") == pytest.approx(moved)
            go(page, "Thresholds")  # another page: the same source, the same threshold, shown and used
            assert shown_threshold(page, "Plan threshold") == pytest.approx(moved)
            line = [y for y in page.evaluate(PLOT_THRESHOLDS) if y is not None]  # the block map's threshold line
            assert line and line == pytest.approx([moved] * len(line))
            shoot(page, "thresholds")
            go(page, "Inspect")
            assert shown_threshold(page, "Plan threshold") == pytest.approx(moved)
            decisions = assert_table_uses(page, moved, "plan p", lm.net.num_blocks)
            assert "bypassed" in decisions and "fired" in decisions
            top5 = table_with(page, "full network")
            assert len(top5["rows"]) == 5 and all(float(r[4]) > 0 for r in top5["rows"])
            shoot(page, "inspect")
            go(page, "Audit")
            files = [str(f) for f in audit_inputs(tmp_path)]
            page.locator(".st-key-audit_files input[type=file]").set_input_files(files)
            page.locator(".st-key-audit_run button").click(timeout=60_000)
            page.get_by_text("Every input").first.wait_for(timeout=240_000)
            settle(page)
            metrics = dict(zip(page.locator("[data-testid=stMetricLabel]").all_inner_texts(),
                               page.locator("[data-testid=stMetricValue]").all_inner_texts()))
            assert {"Accuracy", "Agreement with full", "FLOPs saved", "Time saved", "Failures"} <= set(metrics), metrics
            assert metrics["Failures"] == "1" and metrics["Agreement with full"].endswith("%")
            records = table_with(page, "status")
            assert records["head"][:3] == ["status", "input", "skipped predicts"]
            # the grid draws only the columns in view: scroll it to its right end to read the last ones
            page.evaluate(SCROLL_GRIDS.replace("LEFT", "s.scrollWidth"))
            time.sleep(1)
            assert table_with(page, "SHA-256")["head"][-4:] == ["record_id", "run_id", "input_path", "SHA-256"]
            page.evaluate(SCROLL_GRIDS.replace("LEFT", "0"))  # back: the key columns in view
            shoot(page, "audit")
            assert page.locator("[data-testid=stException]").count() == 0
    for name in ("inspect", "thresholds", "audit"):
        for width in WIDTHS:
            assert (ARTIFACTS / f"{name}_{width}.png").stat().st_size > 20_000

