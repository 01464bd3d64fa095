"""The Streamlit pages, driven by ``streamlit.testing.v1.AppTest``: every page renders, uploads go through the
real ``file_uploader``, and moving the threshold changes the rendered decisions exactly as the engine says.

The app runs with an empty weights folder (the documented fallback: random-init ResNet-20 with a warning), no
data set (generated calibration images) and a small calibration set, so the test is fast and independent of
the training job; the expected values are computed here with the engine from the same model.
"""
from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipviz import FullPolicy, GatePolicy, load_image, dashboard, policies
from skipviz.evaluate import calibration

from conftest import app_environment
from toys import SMALL_CIFAR_MODEL, FakeClock

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "app.py")
ENV = {"SKIPVIZ_CIFAR10": "/nonexistent/cifar10", "SKIPVIZ_CALIB_N": "32", "SKIPVIZ_LATENCY_REPEATS": "5",
       "SKIPVIZ_MODEL": SMALL_CIFAR_MODEL}


@pytest.fixture(scope="module")
def app_env(tmp_path_factory):
    """The app's environment, on a quiet machine whose clock (a fake: tests/toys.FakeClock) shows a clear
    saving of 0.5 ms per call: deterministic wording, and no test waits for real timings."""
    with app_environment({**ENV, "SKIPVIZ_DATA_DIR": str(tmp_path_factory.mktemp("no_weights"))}) as env, \
            pytest.MonkeyPatch.context() as mp:
        FakeClock(full_s=2e-3, saving_s=5e-4, spread_s=1e-6, seed=0).install(mp)
        FakeClock.quiet(mp)
        yield env


@pytest.fixture(scope="module")
def engine(app_env):
    """The model the app loads, built here with the engine."""
    return dashboard.load_model(SMALL_CIFAR_MODEL).net


def new_app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=120)


def png_bytes(seed: int = 0, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def metric(at, label_start: str) -> str:
    return [m.value for m in at.metric if m.label.startswith(label_start)][0]


# st.dataframe elements carry no key in AppTest: find a table by a column only it has
TABLE_COLUMNS = {"blocks": "decision", "top5": "full: class", "calib_summary": "run", "card_table": "field"}


def frame(at, key: str):
    return [d.value for d in at.dataframe if TABLE_COLUMNS[key] in d.value.columns][0]


def expected_decisions(net, data: bytes, threshold: float, overrides=None) -> list[str]:
    image, _ = load_image(data)
    with torch.no_grad():
        ex = net.run(dashboard.preprocess(net, image), GatePolicy(threshold, overrides or {})).executed[0]
    return ["fired" if e else "bypassed" for e in ex.tolist()]


def test_inspect_upload_and_threshold(app_env, engine):
    at = new_app().run()
    assert not at.exception
    assert at.title[0].value.endswith("Inspect one input")
    assert any("weights" in w.value and "missing" in w.value for w in at.warning)  # documented fallback
    at.radio(key="sv_source").set_value("Upload").run()
    data = png_bytes(1)
    at.file_uploader(key="sv_upload").set_value(("mine.png", data, "image/png")).run()
    assert not at.exception and not at.error
    lo, hi = 0.0, 1.0
    at.slider(key="inspect_threshold").set_value(lo).run()
    d_lo = list(frame(at, "blocks")["decision"])
    assert d_lo == expected_decisions(engine, data, lo)
    assert metric(at, "Blocks fired") == f"{d_lo.count('fired')}/{engine.num_blocks}"
    at.slider(key="inspect_threshold").set_value(hi).run()
    table = frame(at, "blocks")
    d_hi = list(table["decision"])
    assert d_hi == expected_decisions(engine, data, hi)
    assert d_hi != d_lo
    assert metric(at, "Blocks fired") == f"{d_hi.count('fired')}/{engine.num_blocks}"
    # top-5 tables side by side, as the engine computes them
    image, _ = load_image(data)
    with torch.no_grad():
        full = torch.softmax(engine(dashboard.preprocess(engine, image))[0], 0)
    top = frame(at, "top5")
    assert top["full: class"].iloc[0] == engine.meta.classes[int(full.argmax())]
    assert top["full: probability"].iloc[0] == pytest.approx(float(full.max()), abs=1e-5)
    time_col = [c for c in table.columns if c.startswith("profile estimate (ms per batch of 1, ")][0]
    assert (table[time_col] > 0).all() and ("CPU" in time_col or "GPU" in time_col)
    saved = [m for m in at.metric if m.label == "Latency saved"][0]  # a short label: device and batch in its help
    assert saved.proto.help.startswith("Per batch of 1, measured on ") and ("CPU" in saved.proto.help or
                                                                          "GPU" in saved.proto.help)
    assert saved.value == "0.50 ms saved" and "95 % CI" in saved.delta
    assert not [w for w in at.warning if "Timings are noisy" in w.value]  # a quiet machine, a clear saving


@pytest.mark.parametrize("name,data,needle", [
    ("empty.png", b"", "empty"),
    ("notes.png", b"this is a text file, not an image" * 10, "not a recognised image"),
    ("cut.png", png_bytes(2)[:120], "truncated"),
    ("bomb.png", bomb_png(), "pixel"),
    ("huge.png", b"\x89PNG" + b"\x00" * (50 * 1024 * 1024 + 16), "limit"),
])
def test_bad_uploads_show_error_and_app_stays_up(app_env, name, data, needle):
    at = new_app().run()
    at.radio(key="sv_source").set_value("Upload").run()
    at.file_uploader(key="sv_upload").set_value((name, data, "image/png")).run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert name in errors and needle in errors.lower()
    assert at.title[0].value.endswith("Inspect one input")
    # the app is still usable: a good upload replaces the bad one
    at.file_uploader(key="sv_upload").set_value(("ok.png", png_bytes(3), "image/png")).run()
    assert not at.error and not at.exception and len(frame(at, "blocks")) == 9


def test_sample_picker(app_env, engine):
    from skipviz.samples import sample_bytes, sample_names

    at = new_app().run()
    name = sample_names()[3]
    at.selectbox(key="sv_sample").set_value(name).run()
    at.slider(key="inspect_threshold").set_value(0.9).run()
    assert list(frame(at, "blocks")["decision"]) == expected_decisions(engine, sample_bytes(name), 0.9)


def test_thresholds_page_live_and_calibration(app_env, engine):
    from skipviz.samples import sample_bytes, sample_names

    at = new_app().run()
    at.switch_page("pages/thresholds.py").run()
    assert not at.exception and at.title[0].value.endswith("Tune thresholds")
    calib = calibration.load_calibration(engine, 32)
    full = calibration.evaluate_calibration(engine, calib, FullPolicy())
    image = sample_bytes(sample_names()[0])
    for t, ov in ((0.0, {}), (1.0, {}), (1.0, {1: "run", 3: "skip"})):
        at.slider(key="thresholds_threshold").set_value(t)
        for i in range(engine.num_blocks):
            at.selectbox(key=f"override_{i}").set_value(ov.get(i, "auto"))
        at.run()
        assert not at.exception
        exp = expected_decisions(engine, image, t, ov)
        assert metric(at, "Blocks fired") == f"{exp.count('fired')}/{engine.num_blocks}"
        point = calibration.evaluate_calibration(engine, calib, policies.make_policy(engine, t, ov), full.predictions)
        assert metric(at, "Agreement with full") == f"{point.agreement:.1%}"
        summary = frame(at, "calib_summary")
        assert summary["agreement with full (%)"].iloc[0] == pytest.approx(100 * point.agreement)
        # the fake clock saves 0.5 of 2 ms per call: 25 %, whatever the policy (its times are the clock's)
        assert "ms saved (95 % CI" in summary["latency saving"].iloc[0] and "25 % of" in summary["latency saving"].iloc[0]
        assert metric(at, "Latency saved per image").endswith("ms saved")
        assert summary["blocks run (mean)"].iloc[0] == pytest.approx(float(point.executed.sum(1).mean()))
    # the threshold is shared with the Inspect page
    at.switch_page("pages/inspect.py").run()
    assert at.slider(key="inspect_threshold").value == 1.0


def test_model_page_card_and_weights_upload(app_env, engine):
    from safetensors.torch import save

    at = new_app().run()
    at.switch_page("pages/model.py").run()
    assert not at.exception
    card = frame(at, "card_table")
    values = dict(zip(card["field"], card["value"]))
    assert values["FLOPs (full, one input)"] == f"{engine.flop_table().full / 1e6:.2f} M"
    at.file_uploader(key="weights_upload").set_value(("junk.safetensors", b"garbage" * 100, "application/octet-stream"))
    at.run()
    assert at.error and "junk.safetensors" in at.error[0].value and not at.exception
    data = save({k: v.contiguous() for k, v in engine.state_dict().items()})
    at.file_uploader(key="weights_upload").set_value(("good.safetensors", data, "application/octet-stream")).run()
    assert not at.error and at.success and not at.exception
    assert at.session_state["sv_model_key"].startswith("upload:")
    assert "good" in at.subheader[1].value  # the card shown is the upload's, on the same interaction
    at.switch_page("pages/inspect.py").run()  # the uploaded model now drives the other pages
    assert not at.exception and len(frame(at, "blocks")) == engine.num_blocks
    at.switch_page("pages/model.py").run()
    if at.file_uploader(key="weights_upload").value is None:  # AppTest drops it on a page switch: put it back
        at.file_uploader(key="weights_upload").set_value(("good.safetensors", data, "application/octet-stream"))
    at.selectbox(key="model_choice").set_value("cifar_resnet32").run()
    at.button(key="use_model").click().run()  # the upload still in the uploader must not take over again
    at.run()
    assert at.session_state["sv_model_key"] == "registry:cifar_resnet32" and not at.exception
    assert "cifar_resnet32" in at.subheader[1].value
    at.file_uploader(key="weights_upload").set_value(("good.safetensors", data, "application/octet-stream")).run()
    assert at.session_state["sv_model_key"].startswith("upload:")  # the same file uploaded again is used again


def test_per_model_settings_are_dropped_when_the_model_changes(app_env):
    at = new_app().run()
    at.switch_page("pages/model.py").run()
    at.selectbox(key="model_choice").set_value("cifar_resnet32").run()
    at.button(key="use_model").click().run()
    at.session_state["sv_overrides"] = {12: "skip"}  # block 12 exists in a ResNet-32, not in a ResNet-20
    at.session_state["sv_thresholds"] = {"gates": 0.9}
    at.run()
    at.selectbox(key="model_choice").set_value(SMALL_CIFAR_MODEL).run()
    at.button(key="use_model").click().run()
    at.switch_page("pages/inspect.py").run()
    assert not at.exception
    assert "sv_overrides" not in at.session_state or not at.session_state["sv_overrides"]
    assert at.slider(key="inspect_threshold").value != 0.9


def test_an_uploaded_image_survives_a_visit_to_another_page(app_env):
    at = new_app().run()
    at.radio(key="sv_source").set_value("Upload").run()
    at.file_uploader(key="sv_upload").set_value(("mine.png", png_bytes(3), "image/png")).run()
    at.switch_page("pages/thresholds.py").run()
    at.switch_page("pages/inspect.py").run()
    assert not at.exception and at.session_state["sv_image"]["name"] == "mine.png"
    assert at.radio(key="sv_source").value == "Upload"


def test_navigation_lists_every_page(app_env):
    at = new_app().run()
    assert not at.exception
    for path in sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pages").glob("[!_]*.py")):
        page = new_app().run().switch_page(path).run()  # raises ValueError for a page left out of navigation
        assert not page.exception, path


def test_redundancy_page(app_env, engine):
    pytest.importorskip("skipviz.redundancy")
    pytest.importorskip("skipviz.figures")
    from skipviz import redundancy

    at = new_app().run()
    at.switch_page("pages/redundancy.py").run()
    assert not at.exception and at.title[0].value.startswith(":material/extension:")
    calib = calibration.load_calibration(engine, 32)
    base = policies.KLRedundancyPolicy.calibrate(engine, calibration.calibration_dataset(calib), q=0.3, method="spatial")
    for q in (0.0, 0.9):
        at.slider(key="kl_q").set_value(q).run()
        assert not at.exception
        table = [d.value for d in at.dataframe if "skipped" in d.value.columns][0]
        assert list(table["skipped"]) == list(base.with_q(q).to_dataframe()["skipped"])
    at.radio(key="red_divergence").set_value("js").run()
    assert not at.exception


def test_explain_page(app_env):
    pytest.importorskip("skipviz.explain")
    at = new_app().run()
    at.switch_page("pages/explain.py").run()
    assert not at.exception and at.title[0].value.startswith(":material/lightbulb:")
    assert any("spearman" in d.value.columns for d in at.dataframe)


def test_audit_page(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_AUDIT_DIR", str(tmp_path / "audits"))
    at = new_app().run()
    at.switch_page("pages/audit.py").run()
    assert not at.exception and not at.text_input  # no server path is taken from the browser
    at.file_uploader(key="audit_files").set_value([("a.png", png_bytes(7), "image/png"),
                                                   ("broken.png", b"not an image", "image/png")]).run()
    at.button(key="audit_run").click().run()
    assert not at.exception and at.success and "1 audited, 1 failed" in at.success[0].value
    assert len(at.get("download_button")) == 5  # zip, HTML, JSON, CSV and the session's database
    # the page opens with the run's summary: accuracy, agreement (with its interval), FLOPs and time saved, failures
    metrics = {m.label: m for m in at.metric}
    assert list(metrics) == ["Accuracy", "Agreement with full", "FLOPs saved", "Time saved", "Failures"]
    assert metrics["Failures"].value == "1" and metrics["Accuracy"].value == "n/a"  # no labels
    agreement = metrics["Agreement with full"]
    assert agreement.delta.startswith("CI ") and "Wilson" in agreement.proto.help
    frame = [d.value for d in at.dataframe if "status" in d.value.columns][0]  # the run's records
    assert list(frame.columns[:3]) == ["status", "input_name", "predicted"]
    assert list(frame.columns[-4:]) == ["record_id", "run_id", "input_path", "input_sha256"]
    assert "broken.png" in set(frame["input_name"])  # messages and rows name the uploaded file
    runs = at.dataframe[-1].value  # the session's runs, their policy in words
    assert runs["policy"].iloc[0].startswith("gates, threshold ") and "{" not in runs["policy"].iloc[0]
    dbs = list((tmp_path / "audits").glob("session-*.sqlite"))
    assert len(dbs) == 1 and at.session_state["sv_audit_token"] in dbs[0].name


def test_audit_page_checks_a_share_against_the_full_network_and_says_so(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_AUDIT_DIR", str(tmp_path / "audits"))
    at = new_app().run()
    at.switch_page("pages/audit.py").run()
    files = [(f"{i}.png", png_bytes(i), "image/png") for i in range(12)]
    at.file_uploader(key="audit_files").set_value(files).run()
    at.select_slider(key="audit_shadow").set_value(0.25).run()
    at.button(key="audit_run").click().run()
    assert not at.exception and "12 audited" in at.success[0].value
    frame = [d.value for d in at.dataframe if "status" in d.value.columns][0]
    unchecked = int(frame["agree"].isna().sum())
    assert 0 < unchecked < 12  # the others were checked; none is counted as agreeing
    agreement = {m.label: m for m in at.metric}["Agreement with full"]
    assert f"{unchecked} not checked" in agreement.proto.help


def test_audit_page_sessions_have_their_own_databases(app_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPVIZ_AUDIT_DIR", str(tmp_path / "audits"))
    first, second = new_app().run(), new_app().run()
    for at in (first, second):
        at.switch_page("pages/audit.py").run()
        at.file_uploader(key="audit_files").set_value([("a.png", png_bytes(7), "image/png")]).run()
        at.button(key="audit_run").click().run()
        assert not at.exception and at.success
    assert first.session_state["sv_audit_token"] != second.session_state["sv_audit_token"]
    assert len(list((tmp_path / "audits").glob("session-*.sqlite"))) == 2
    # each session lists only its own run
    assert len(first.dataframe[-1].value) == 1 and len(second.dataframe[-1].value) == 1  # the runs table


def test_audit_page_says_when_the_server_folder_is_unusable(app_env, tmp_path, monkeypatch):
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv("SKIPVIZ_AUDIT_DIR", str(tmp_path / "not_a_folder"))
    at = new_app().run()
    at.switch_page("pages/audit.py").run()
    assert not at.exception and any("audit database cannot be opened" in e.value for e in at.error)


def test_a_model_without_trained_weights_says_so_on_every_page(app_env):
    at = new_app().run()
    at.switch_page("pages/model.py").run()
    at.selectbox(key="model_choice").set_value("cifar_resnet32").run()
    at.button(key="use_model").click().run()
    for path in ("pages/inspect.py", "pages/thresholds.py", "pages/redundancy.py", "pages/explain.py",
                 "pages/audit.py", "pages/model.py"):
        at.switch_page(path).run()
        assert not at.exception, path
        assert any("no trained weights" in w.value and "meaningless" in w.value for w in at.warning), path


def test_uploads_of_every_readable_format_and_a_refused_file_clears_the_result(app_env, engine):
    at = new_app().run()
    at.radio(key="sv_source").set_value("Upload").run()
    image = Image.open(io.BytesIO(png_bytes(4)))
    for fmt, suffix in (("TIFF", "tif"), ("ICO", "ico")):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        at.file_uploader(key="sv_upload").set_value((f"mine.{suffix}", buf.getvalue(), "image/x-test")).run()
        assert not at.exception and not at.error, fmt
        assert len(frame(at, "blocks")) == engine.num_blocks
    at.file_uploader(key="sv_upload").set_value(("drawing.svg", b"<svg></svg>" * 20, "image/svg+xml")).run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "drawing.svg" in errors and "not a recognised image" in errors
    assert not [d for d in at.dataframe if "decision" in d.value.columns]  # the previous image's result is gone
    assert not at.metric


def test_thresholds_page_words_and_percents(app_env):
    at = new_app().run()
    at.switch_page("pages/thresholds.py").run()
    assert at.slider(key="thresholds_threshold").label == "Gate threshold"
    assert not [m for m in at.metric if re.search(r"(^|\s)-0\.0+(%| pts)", f"{m.value} {m.delta}")]
    at.switch_page("pages/explain.py").run()
    caption = " ".join(c.value for c in at.caption)
    assert "Policy: gates, threshold" in caption and "{" not in caption


def test_downsampling_skips_are_warned_about(app_env, engine):
    at = new_app().run()
    at.switch_page("pages/thresholds.py").run()
    down = next(i for i, b in enumerate(engine.blocks) if b.downsample and b.bypassable)
    at.selectbox(key=f"override_{down}").set_value("skip").run()
    assert not at.exception
    assert any("shortcut" in w.value and "shape" in w.value for w in at.warning)
    at.switch_page("pages/redundancy.py").run()
    table = [d.value for d in at.dataframe if "agreement with full" in d.value.columns][0]
    assert any("1 override in force" in p for p in table["policy"])


EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F]")


def test_pages_use_material_icons_not_emoji():
    """Headless Chromium has no emoji font: icons are ``:material/...:`` names, no emoji in any page's text."""
    for path in [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]:
        text = path.read_text(encoding="utf-8")
        assert not EMOJI.findall(text), (path.name, EMOJI.findall(text))
        for icon in re.findall(r"icon=\"([^\"]*)\"", text):
            assert icon.startswith(":material/") and icon.endswith(":"), (path.name, icon)

