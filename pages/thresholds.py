"""Thresholds: a global threshold and per-block overrides, live for the current image and a calibration set; accuracy
against the paired, measured latency saving at a chosen batch size."""
from __future__ import annotations

import streamlit as st

from pages import _shared
from skipviz import dashboard, figures, policies

st.title(":material/tune: Tune thresholds")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
net = lm.net

if not net.gated_blocks:
    st.info(f"{net.meta.display_name} has no gate heads: every block always runs unless forced to skip below.")

cur = _shared.current_image()
source = _shared.source_picker(lm, "thresholds_source")
sweep = _shared.calibration_sweep(model_key, lm, source)
st.caption(f"Calibration set: {sweep.calib.source}. Precomputed once per process for every slider value "
           f"({len(sweep.points)} thresholds) on {sweep.device}; per-block overrides are computed on demand and "
           "cached.")


@st.fragment
def live_view() -> None:
    t = st.slider("Global gate threshold", 0.0, 1.0, value=_shared.session_threshold(lm, source),
                  step=0.05, key="thresholds_threshold")
    st.session_state["sv_threshold"] = t
    with st.expander("Per-block overrides (run / skip / auto)", expanded=False):
        saved = _shared.overrides()
        cols = st.columns(3)
        choices = {}
        for i, name in enumerate(net.block_names):
            label = f"{i}: {name}" + (" ▼" if net.blocks[i].downsample else "") + \
                ("" if i in net.gated_blocks else " (no gate)")
            options = ["auto", "run", "skip"]
            choices[i] = cols[i % 3].selectbox(label, options, index=options.index(saved.get(i, "auto")),
                                              key=f"override_{i}")
    ov = dashboard.overrides_from_choices(choices)
    st.session_state["sv_overrides"] = ov
    policy = policies.make_policy(net, t, ov, source)

    st.subheader("Current image")
    if cur is not None:
        x, full_trace = _shared.prepared_input(model_key, cur.info.sha256, net, cur.image)
        res = dashboard.inspect(net, x, policy, full_trace)
        tr = res.trace
        a, b = st.columns([1, 3])
        a.image(cur.image, caption=cur.label, width=140)
        a.metric("Prediction", tr.predicted_label, f"{'agrees' if res.agrees else 'differs from'} full "
                 f"({res.full_trace.predicted_label})", delta_color="normal" if res.agrees else "inverse")
        a.metric("Blocks fired", f"{tr.blocks_executed}/{tr.blocks_total}", f"{tr.flops_saved_fraction:.1%} FLOPs saved",
                 delta_color="off")
        b.plotly_chart(figures.block_map_figure(tr), key="thr_block_map", width="stretch")

    st.subheader("Calibration set")
    batch = _shared.batch_picker("thresholds_batch")
    point = sweep.point_for(net, t, ov)
    latencies = _shared.latency_sweep(model_key, lm, sweep, batch)
    saving = _shared.point_saving(model_key, lm, sweep, policy, batch, t, ov)
    m1, m2, m3, m4 = st.columns(4)
    acc_name = "Accuracy" if sweep.calib.labelled else "Accuracy (= agreement, no labels)"
    m1.metric(acc_name, f"{point.accuracy:.1%}", f"{100 * (point.accuracy - sweep.full.accuracy):+.1f} pts vs full")
    m2.metric("Agreement with full", f"{point.agreement:.1%}")
    per_image = saving.per_input()
    m3.metric(f"Latency saved per image ({saving.device}, batch {saving.batch_size})", per_image.headline(),
              per_image.detail(), delta_color="off", delta_arrow="off")
    m4.metric("FLOPs executed", f"{point.flops_fraction:.1%} of full")
    _shared.latency_warning([*latencies.values(), saving])
    if saving.batch_size != batch:
        st.caption(f"Batch {batch} asked; the calibration set has {len(sweep.calib)} images, so batches of "
                   f"{saving.batch_size} are timed.")
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.pareto_figure(sweep, point, latencies, saving), key="pareto", width="stretch")
    c2.plotly_chart(figures.skip_rate_figure(point, net), key="skip_rate", width="stretch")
    st.caption(f"Latency: each threshold timed against the full network, {saving.describe()} over the "
               "calibration set's first images; bars are the bootstrap 95 % interval of the paired saving.")
    st.dataframe(dashboard.calibration_table(point, sweep.full, saving), hide_index=True, key="calib_summary")
    with st.expander("Every precomputed threshold"):
        st.dataframe(dashboard.sweep_table(sweep, latencies), hide_index=True, key="sweep_table")


live_view()
