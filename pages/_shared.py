"""Streamlit glue shared by the pages: process-wide caches (one model per process, shared by every session),
the session's current model, image, threshold and overrides. No computation here: see ``skipviz.dashboard``."""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

import streamlit as st
from PIL import Image

from skipviz import DEFAULT_MODEL, ImageInfo, ImageLoadError, keep_heap_memory, load_image, dashboard, policies
from skipviz._imageio import IMAGE_SUFFIXES
from skipviz.data import normalize
from skipviz.evaluate import calibration
from skipviz.measure.saving import PairedSaving, trust_note
from skipviz.samples import sample_bytes, sample_names

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

#: Every image format the library reads (:data:`skipviz._imageio.IMAGE_SUFFIXES`), for the audit's uploader filter.
IMAGE_TYPES = [s.lstrip(".") for s in IMAGE_SUFFIXES]
#: How the uploaders name the formats.
IMAGE_FORMATS_TEXT = "PNG, JPEG, WebP, BMP, GIF (first frame), TIFF, ICO, PNM, TGA, PCX"


def default_model_name() -> str:
    """``$SKIPVIZ_MODEL`` or the project's default (``skipviz.DEFAULT_MODEL``: EfficientNet-Lite0 on ImageNet)."""
    return os.environ.get("SKIPVIZ_MODEL", DEFAULT_MODEL)


def calibration_size() -> int:
    return int(os.environ.get("SKIPVIZ_CALIB_N", "256"))


def latency_rounds() -> int:
    """Interleaved paired rounds per latency figure (``$SKIPVIZ_LATENCY_REPEATS``, default 15; at least 3 so the
    saving has a bootstrap interval)."""
    return max(3, int(os.environ.get("SKIPVIZ_LATENCY_REPEATS", "15")))


@st.cache_resource(show_spinner="Loading the model (once per process)...")
def registry_model(name: str, weights_state: str = "") -> dashboard.LoadedModel:
    """A registered model, once per process and state of its weights file (``dashboard.weights_state``): a model
    shown at random init because its weights were missing is loaded again once they exist."""
    dashboard.configure_threads()
    keep_heap_memory()  # once per process: activations are not page-faulted in again on every run
    return dashboard.load_model(name)


def warm_default_model() -> None:
    """Load the default model into :func:`registry_model`'s process-wide cache and run it once on the default
    sample, before any browser asks (``app.py``'s server start-up hook runs this in a thread). The first page
    request then finds the imports done, the model built and the kernels primed: measured on the 2-core AMD EPYC,
    the page request to the first block map took 6.0-6.6 s without it (importing timm, torchvision and
    ``torch._dynamo`` alone 1.4-2.1 s) and 3.3 s with it (benchmarks/results/first_prediction.md). A session that
    asks while it runs waits for the same cache entry instead of building a second copy."""
    import plotly.graph_objects  # noqa: F401  - the Inspect page's figures

    from skipviz import figures  # noqa: F401

    name = default_model_name()
    lm = registry_model(name, dashboard.weights_state(name))
    image, _ = load_image(sample_bytes(sample_names()[0]))
    dashboard.run_full(lm.net, dashboard.preprocess(lm.net, image))


#: What the server prints once the default model is loaded (benchmarks/first_prediction.py waits for it).
READY_LINE = "skipviz: default model ready"


def warm_default_model_logged() -> None:
    """:func:`warm_default_model` from the server's start-up thread: prints :data:`READY_LINE` with the seconds it
    took, or why it failed (the first page then loads the model itself and shows the error there)."""
    import logging
    import sys
    import time

    # cached functions called outside a session warn "missing ScriptRunContext" (harmless here: no session)
    context_log = logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context")
    level, t0 = context_log.level, time.perf_counter()
    context_log.setLevel(logging.ERROR)
    try:
        warm_default_model()
    except Exception as e:
        print(f"skipviz: loading the default model at start-up failed ({type(e).__name__}: {e}); the first page "
              "loads it", file=sys.stderr, flush=True)
    else:
        print(f"{READY_LINE} (built and run once in {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    finally:
        context_log.setLevel(level)


@st.cache_resource(max_entries=8, show_spinner="Loading the uploaded weights...")
def uploaded_model(arch: str, sha256: str, filename: str, _data: bytes) -> dashboard.LoadedModel:
    return dashboard.load_uploaded_weights(arch, _data, filename)


#: Session settings that belong to one model: its thresholds (one per decision source), decision source and
#: per-block overrides (and the widgets showing them, :data:`PER_MODEL_WIDGETS`). They are dropped when the
#: session's model changes.
PER_MODEL_STATE = ("sv_thresholds", "sv_decisions", "sv_overrides", "sv_batch", "inspect_batch", "thresholds_batch")
#: Prefixes of the per-model widgets' keys (the threshold sliders of every source, the override selectors).
PER_MODEL_WIDGETS = ("inspect_threshold", "thresholds_threshold", "override_")


def current_model() -> tuple[str, dashboard.LoadedModel]:
    """The session's model: ``(key, LoadedModel)``; the key identifies it in every cache. When it differs from
    the model of the session's previous run, the per-model settings (:data:`PER_MODEL_STATE`, the sliders and
    override widgets) are reset: another model's block indices and thresholds do not apply."""
    key = st.session_state.get("sv_model_key") or f"registry:{default_model_name()}"
    if key.startswith("upload:"):
        up = st.session_state.get("sv_model_upload")
        if up is not None:
            lm = uploaded_model(up["arch"], up["sha256"], up["filename"], up["data"])
        else:
            key = f"registry:{default_model_name()}"
    if not key.startswith("upload:"):
        name = registry_name(key)
        state = dashboard.weights_state(name)
        lm = registry_model(name, state)
        # the key names the weights file's state too: every cache keyed on it (prepared inputs, sweeps, KL)
        # follows a weights file that appears or changes
        key = f"registry:{name}@{digest(state.encode())[:12]}" if state else f"registry:{name}"
    if st.session_state.get("sv_model_seen", key) != key:
        for k in list(st.session_state):
            if k in PER_MODEL_STATE or str(k).startswith(PER_MODEL_WIDGETS):
                del st.session_state[k]
    st.session_state["sv_model_seen"] = key
    return key, lm


def registry_name(model_key: str) -> str:
    """The registered model name in a ``registry:NAME[@STATE]`` model key."""
    return model_key.split(":", 1)[1].split("@", 1)[0]


@dataclass
class CurrentImage:
    image: Image.Image
    info: ImageInfo
    label: str


def _set_image(data: bytes, name: str) -> None:
    st.session_state["sv_image"] = {"data": data, "name": name}


def current_image() -> CurrentImage | None:
    """The session's image (default: the first built-in sample); shows ``st.error`` with the reason and returns
    None if it cannot be read: a refused upload replaces the previous image, so no page shows its result."""
    img = st.session_state.get("sv_image")
    if img is None:
        name = sample_names()[0]
        img = {"data": sample_bytes(name), "name": name}
    try:
        image, info = load_image(img["data"])
    except ImageLoadError as e:
        st.error(f"Cannot use {img['name']!r}: {e}. Nothing is shown for it: upload another image or pick a "
                 "built-in sample.", icon=":material/broken_image:")
        return None
    return CurrentImage(image, info, img["name"])


def image_picker() -> None:
    """Upload or built-in sample; puts the chosen bytes in the session (errors are shown by current_image)."""
    stored = st.session_state.get("sv_image")
    uploaded = stored is not None and stored.get("name") not in sample_names()
    # the radio's state is dropped when the user visits another page: start it from the stored image, so
    # coming back does not replace an upload with a sample
    source = st.radio("Image source", ["Built-in sample", "Upload"], index=1 if uploaded else 0, horizontal=True,
                      key="sv_source")
    if source == "Upload":
        # no file-type filter: the browser would block a file it does not match with only a red icon, leaving the
        # previous image's result on screen; every file goes to load_image, which reads it or says why not
        # (current_image shows the reason and no result)
        up = st.file_uploader(f"Upload an image ({IMAGE_FORMATS_TEXT})", key="sv_upload")
        if up is not None:
            _set_image(up.getvalue(), up.name)
    else:
        names = sample_names()
        current = st.session_state.get("sv_image", {}).get("name")
        choice = st.selectbox("Sample image", names, index=names.index(current) if current in names else 0,
                              key="sv_sample")
        _set_image(sample_bytes(choice), choice)


@st.cache_resource(max_entries=64)
def prepared_input(model_key: str, sha256: str, _net, _image: Image.Image):
    """``(x (1, 3, H, W), full-network trace)`` for an image, once per model and image."""
    x = dashboard.preprocess(_net, _image)
    return x, dashboard.run_full(_net, x)


def overrides(net=None) -> dict:
    """The session's per-block overrides (``sv_overrides``); with ``net``, without force-skips of blocks that cannot
    be skipped (:func:`skipviz.dashboard.refuse_unskippable`): no policy the pages build asks for one."""
    ov = dict(st.session_state.get("sv_overrides", {}))
    return dashboard.refuse_unskippable(net, ov)[0] if net is not None else ov


def decision_source(net) -> str:
    """The session's decision source (``skipviz.policies.DECISION_SOURCES``), one the model offers; default: the
    card's ``default_source``, else the gates."""
    offered = dashboard.decision_sources(net) or ["gates"]
    default = net.meta.default_source(offered)  # the card's recommended source, else the gates
    default = default if default in offered else offered[0]
    source = st.session_state.get("sv_decisions", default)
    return source if source in offered else default


def session_threshold(lm: dashboard.LoadedModel, source: str) -> float:
    """The one threshold in use for a decision source (``sv_thresholds[source]``, dropped with the model): the
    source's card default until a slider moves it. Every page's slider shows it and every policy uses it."""
    return float(st.session_state.get("sv_thresholds", {}).get(source, lm.default_threshold_for(source)))


def set_session_threshold(source: str, value: float) -> None:
    """Store the threshold in use for ``source`` (see :func:`session_threshold`)."""
    st.session_state["sv_thresholds"] = {**st.session_state.get("sv_thresholds", {}), source: float(value)}


def session_policy(lm: dashboard.LoadedModel):
    """The policy the session set on the Inspect / Thresholds pages: its decision source at its threshold (the
    source's card default until moved) with its per-block overrides."""
    source = decision_source(lm.net)
    return policies.make_policy(lm.net, session_threshold(lm, source), overrides(lm.net), source)




def threshold_key(page: str, source: str) -> str:
    """The widget key of a page's threshold slider for a decision source: one slider per source
    (``inspect_threshold`` for the gates, ``inspect_threshold_plan`` for the plan), so a switch of source shows
    another widget, created at that source's threshold. One shared key would let the browser keep showing the
    other source's value (Streamlit keeps a widget's client-side value when only its default changes)."""
    base = f"{page}_threshold"
    return base if source == "gates" else f"{base}_{source}"


def threshold_label(source: str) -> str:
    """``"Gate threshold"``, ``"Plan threshold"`` or ``"Exit threshold"``: what the slider sets under a decision
    source."""
    return {"gates": "Gate threshold", "plan": "Plan threshold", "early_exit": "Exit threshold"}.get(
        source, f"{source.capitalize()} threshold")


def threshold_slider(lm: dashboard.LoadedModel, source: str, page: str) -> float:
    """The page's threshold slider for ``source``: shows and sets the one threshold in use
    (:func:`session_threshold`), under a key of its own per source (:func:`threshold_key`), with the model card's
    named operating points (:func:`operating_point_buttons`) above it. The widget's value lives in the session
    state under its key, seeded from the threshold in use when the slider is not on screen yet, so a button can
    move it before it is drawn."""
    key = threshold_key(page, source)
    if key not in st.session_state:
        st.session_state[key] = session_threshold(lm, source)
    operating_point_buttons(lm, source, key)
    t = st.slider(threshold_label(source), 0.0, 1.0, step=0.05, key=key,
                  help=f"{policies.DECISION_SOURCES[source].rule.capitalize()} "
                       f"({policies.DECISION_SOURCES[source].label}); the same value on every page.")
    set_session_threshold(source, t)
    return float(t)


def operating_point_buttons(lm: dashboard.LoadedModel, source: str, slider_key: str) -> None:
    """One button per operating point the model card names for ``source`` ("fast", "faithful"): a click sets the
    slider (``slider_key``, not drawn yet on this run) to its threshold. Nothing when the card names none."""
    points = lm.net.meta.operating_point_records(source)
    if not points:
        return
    cols = st.columns(len(points) + 1, vertical_alignment="center")
    cols[0].caption("Card's operating points:")
    for col, point in zip(cols[1:], points):
        met = "" if point.met_on_validation else " The validation split did not meet this rule: it is the closest point."
        if col.button(f"{point.name} ({point.threshold:.2f})", key=f"{slider_key}_op_{point.name}",
                      help=f"{point.name}: {point.rule or 'the operating point the model card names'}.{met}"):
            st.session_state[slider_key] = point.threshold


def source_picker(lm: dashboard.LoadedModel, key: str) -> str:
    """A radio choosing where decisions come from, shown only when the model offers more than one. Each source
    keeps its own threshold (:func:`session_threshold`): the slider drawn after it shows that source's."""
    net = lm.net
    offered = dashboard.decision_sources(net)
    if len(offered) < 2:
        return decision_source(net)
    previous = decision_source(net)
    source = st.radio("Decisions from", offered, index=offered.index(previous), horizontal=True,
                      key=key, format_func=lambda s: policies.DECISION_SOURCES[s].label)
    st.session_state["sv_decisions"] = source
    return source


def _override_label(net, i: int) -> str:
    block = net.blocks[i]
    if not block.bypassable:
        return f"{i}: {net.block_names[i]} (no bypass: always runs)"
    return (f"{i}: {net.block_names[i]}" + (" ▼ shortcut changes shape" if block.downsample else "")
            + ("" if i in net.gated_blocks or decision_source(net) == "early_exit" else " (no gate)"))


def override_selectors(net) -> dict:
    """The per-block override selectors (auto / run / skip) and the overrides they set, stored in the session
    (``sv_overrides``). A block without a bypass offers no ``skip``, and the page says why; a stored force-skip
    of such a block is refused with the reason."""
    kept, refused = dashboard.refuse_unskippable(net, overrides())
    for reason in refused.values():
        st.error(f"Override refused: {reason}.", icon=":material/block:")
    fixed = [i for i in range(net.num_blocks) if not net.blocks[i].bypassable]
    if fixed:
        st.caption(f"Blocks {', '.join(str(i) for i in fixed)} change the feature map's shape and have no shortcut "
                   "to stand in for them: they always run, so they cannot be forced to skip.")
    cols = st.columns(3)
    choices = {}
    for i in range(net.num_blocks):
        options = dashboard.override_options(net, i)
        current = kept.get(i, "auto")
        help_text = dashboard.skip_refusal(net, i) or (
            "A downsampling block: skipping it takes its shortcut, which changes the feature map's shape."
            if net.blocks[i].downsample else None)
        choices[i] = cols[i % 3].selectbox(_override_label(net, i), options,
                                           index=options.index(current) if current in options else 0,
                                           key=f"override_{i}", help=help_text)
    ov, _ = dashboard.refuse_unskippable(net, dashboard.overrides_from_choices(choices))
    st.session_state["sv_overrides"] = ov
    return ov


def shape_warning(net, ov: dict) -> None:
    """Warn when the overrides force a downsampling block to skip: its shortcut changes the shape."""
    blocks = dashboard.shape_changing_skips(net, ov)
    if blocks:
        st.warning(dashboard.shape_change_warning(net, blocks), icon=":material/warning:")


@st.cache_resource
def _sweep_store() -> dict:
    return {"lock": threading.Lock(), "sweeps": {}}


def calibration_sweep(model_key: str, lm: dashboard.LoadedModel, source: str = "gates") -> calibration.CalibrationSweep:
    """The precomputed calibration sweep for a model and decision source (once per process, with a progress bar
    the first time)."""
    store = _sweep_store()
    n = calibration_size() if tuple(lm.net.meta.input_size[-2:]) <= (64, 64) else min(32, calibration_size())
    key = (model_key, n, source)
    with store["lock"]:
        if key not in store["sweeps"]:
            bar = st.progress(0.0, text="Preparing the calibration set...")
            calib = calibration.load_calibration(lm.net, n)

            def progress(frac: float, text: str) -> None:
                bar.progress(min(1.0, frac), text=f"Precomputing {len(calib)} images x {len(calibration.threshold_grid())}"
                                                  f" thresholds: {text}")

            store["sweeps"][key] = calibration.sweep_calibration(lm.net, calib, progress=progress, source=source)
            bar.empty()
        return store["sweeps"][key]


def column_config(columns) -> dict:
    """``st.column_config`` entries for a table's column displays (``{name: skipviz.dashboard.Column}``): short
    labels, widths, formats, fractions as percents, the long name in the help."""
    cc = st.column_config
    out = {}
    for name, c in columns.items():
        common = {"label": c.label, "width": c.width, "help": c.help}
        if c.kind == "number":
            out[name] = cc.NumberColumn(format=c.format, **common)
        elif c.kind == "percent":
            out[name] = cc.NumberColumn(format="percent", **common)
        elif c.kind == "progress":
            out[name] = cc.ProgressColumn(format="percent", min_value=0.0, max_value=1.0, **common)
        elif c.kind == "checkbox":
            out[name] = cc.CheckboxColumn(**common)
        else:
            out[name] = cc.TextColumn(**common)
    return out


def show_metric(col, m: dashboard.Metric) -> None:
    """A headline number (``skipviz.dashboard.Metric``) as ``st.metric``: its detail under it, no arrow."""
    col.metric(m.label, m.value, m.detail, help=m.help, delta_color="off", delta_arrow="off")


def model_banner(lm: dashboard.LoadedModel) -> None:
    if lm.warning:
        st.warning(lm.warning, icon=":material/warning:")


# --------------------------------------------------------------------------------------------- latency
def batch_picker(key: str) -> int:
    """A radio of :data:`skipviz.dashboard.BATCH_SIZES`, shared by the pages (``sv_batch``, default 1)."""
    sizes = list(dashboard.BATCH_SIZES)
    current = int(st.session_state.get("sv_batch", sizes[0]))
    b = st.radio("Batch size timed", sizes, index=sizes.index(current) if current in sizes else 0, horizontal=True,
                 key=key, help="Latency is measured on a batch of this size: the image itself at 1, the image and "
                               "calibration images above.")
    st.session_state["sv_batch"] = int(b)
    return int(b)


@st.cache_resource(max_entries=4, show_spinner="Loading calibration images to fill larger batches...")
def batch_fillers(model_key: str, _lm: dashboard.LoadedModel):
    """Normalised calibration images (max batch - 1 of them) that fill the live view's larger batches."""
    net = _lm.net
    calib = calibration.load_calibration(net, max(dashboard.BATCH_SIZES) - 1)
    dev = next(net.parameters()).device
    return normalize(calib.images.to(dev), net.meta.mean, net.meta.std)


@st.cache_resource
def _latency_store() -> dict:
    return {"lock": threading.Lock(), "profiles": {}, "live": {}, "sweeps": {}, "points": {}}


def _progress(text: str):
    bar = st.progress(0.0, text=text)

    def update(frac: float, what: str) -> None:
        bar.progress(min(1.0, max(0.0, frac)), text=f"{text} {what}")
    return bar, update


def live_latency(model_key: str, sha256: str, lm: dashboard.LoadedModel, x, policy, batch_size: int,
                 again: bool = False) -> dashboard.LiveLatency:
    """The live view's latency for an image, policy and batch size: measured once per process (``again``: anew),
    its block profile once per model and batch size, with a progress bar while it runs."""
    store, net = _latency_store(), lm.net
    others = batch_fillers(model_key, lm) if batch_size > 1 else None
    xb, described = dashboard.live_batch(x, others, batch_size)
    key = (model_key, sha256, repr(policy.config()), batch_size, latency_rounds())
    with store["lock"]:
        if again:
            store["live"].pop(key, None)
        if key not in store["live"]:
            bar, update = _progress(f"Timing batch {batch_size}:")
            pkey = (model_key, batch_size)
            if pkey not in store["profiles"]:
                update(0.05, "profiling every block (once per model and batch size)...")
                store["profiles"][pkey] = dashboard.block_profile(net, xb)
            update(0.5, f"full and skipped in {latency_rounds()} interleaved paired rounds...")
            store["live"][key] = dashboard.live_latency(net, xb, policy, store["profiles"][pkey], described,
                                                        latency_rounds())
            bar.empty()
        return store["live"][key]


def latency_sweep(model_key: str, lm: dashboard.LoadedModel, sweep: calibration.CalibrationSweep,
                  batch_size: int) -> dict[float, PairedSaving]:
    """The paired saving of every grid threshold at ``batch_size`` (once per process, with a progress bar)."""
    store = _latency_store()
    key = (model_key, len(sweep.calib), sweep.source, batch_size, latency_rounds())
    with store["lock"]:
        if key not in store["sweeps"]:
            bar, update = _progress(f"Timing {len(sweep.points)} thresholds against the full network at batch "
                                    f"{batch_size} ({latency_rounds()} paired rounds each):")
            store["sweeps"][key] = dashboard.latency_sweep(lm.net, sweep, batch_size, latency_rounds(), update)
            bar.empty()
        return store["sweeps"][key]


def point_saving(model_key: str, lm: dashboard.LoadedModel, sweep: calibration.CalibrationSweep, policy,
                 batch_size: int, threshold: float, overrides: dict) -> PairedSaving:
    """The current setting's paired saving: the grid's when it has no overrides, else measured once."""
    if not overrides and round(float(threshold), 4) in sweep.points:
        return latency_sweep(model_key, lm, sweep, batch_size)[round(float(threshold), 4)]
    store = _latency_store()
    key = (model_key, len(sweep.calib), repr(policy.config()), batch_size, latency_rounds())
    with store["lock"]:
        if key not in store["points"]:
            with st.spinner("Timing the current setting against the full network..."):
                store["points"][key] = dashboard.point_saving(lm.net, sweep.calib, policy, batch_size,
                                                              latency_rounds())
        return store["points"][key]


def latency_warning(savings) -> None:
    """Say so when latencies cannot be trusted: the machine was busy or a spread is wider than its effect."""
    note = trust_note(savings)
    if note:
        st.warning(note, icon=":material/speed:")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _kl_heatmap(net, x, trace) -> None:
    from skipviz import figures, redundancy

    st.subheader("Inter-layer divergence for this input")
    methods = redundancy.available_methods(net)
    method = st.radio("KL definition", methods, horizontal=True, key="inspect_kl_method",
                      format_func=lambda m: m.capitalize() + " KL")
    st.caption(redundancy.METHOD_DESCRIPTIONS[method])
    m = redundancy.kl_matrix(net, x, method)[0]
    st.plotly_chart(figures.kl_heatmap(m, net.block_names, "kl", method), key="inspect_kl", width="stretch")


def inspect_extras() -> list:
    """Renderers ``fn(net, x, trace)`` added to the Inspect page by optional modules (the per-input KL heatmap)."""
    try:
        from skipviz import figures, redundancy  # noqa: F401
    except Exception:  # the redundancy issue's modules are optional
        return []
    if hasattr(redundancy, "kl_matrix") and hasattr(figures, "kl_heatmap"):
        return [_kl_heatmap]
    return []
