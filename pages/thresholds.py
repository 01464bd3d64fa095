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

if not dashboard.decision_sources(net):
    st.info(f"{net.meta.display_name} has no decision heads: every block always runs unless forced to skip below.")

cur = _shared.current_image()
source = _shared.source_picker(lm, "thresholds_source")
sweep = _shared.calibration_sweep(model_key, lm, source)
st.caption(f"Calibration set: {sweep.calib.source}. Precomputed once per process for every slider value "
           f"({len(sweep.points)} thresholds) on {sweep.device}; per-block overrides are computed on demand and "
           "cached.")


@st.fragment
def live_view() -> None:
    t = _shared.threshold_slider(lm, source, "thresholds")
    with st.expander("Per-block overrides (run / skip / auto)", expanded=False):
        ov = _shared.override_selectors(net)
    _shared.shape_warning(net, ov)
    policy = policies.make_policy(net, t, ov, source)

    st.subheader("Current image")
    if cur is not None:
        x, full_trace = _shared.prepared_input(model_key, cur.info.sha256, net, cur.image)
        res = dashboard.inspect(net, x, policy, full_trace)
        tr = res.trace
        a, b = st.columns([1, 3])
        a.image(cur.image, caption=cur.label, width=140)
        a.metric("Prediction", tr.predicted_label, f"{'agrees with' if res.agrees else 'differs from'} full "
                 f"({res.full_trace.predicted_label})", delta_color="normal" if res.agrees else "inverse",
                 delta_arrow="off")
        a.metric("Blocks fired", f"{tr.blocks_executed}/{tr.blocks_total}",
                 f"{dashboard.percent(tr.flops_saved_fraction)} FLOPs saved", delta_color="off", delta_arrow="off")
        b.plotly_chart(figures.block_map_figure(tr), key="thr_block_map", width="stretch")

    st.subheader("Calibration set")
    batch = _shared.batch_picker("thresholds_batch")
    point = sweep.point_for(net, t, ov)
    latencies = _shared.latency_sweep(model_key, lm, sweep, batch)
    saving = _shared.point_saving(model_key, lm, sweep, policy, batch, t, ov)
    m1, m2, m3, m4 = st.columns([1, 1, 1.6, 1])
    acc_help = ("Top-1 accuracy over the labelled calibration set." if sweep.calib.labelled else
                "The calibration set has no labels: accuracy is agreement with the full network.")
    m1.metric("Accuracy", dashboard.percent(point.accuracy),
              f"{dashboard.percent_points(point.accuracy - sweep.full.accuracy)} vs full", delta_color="off",
              delta_arrow="off", help=acc_help)
    m2.metric("Agreement with full", dashboard.percent(point.agreement),
              help="Calibration images whose prediction equals the full network's.")
    per_image = saving.per_input()
    _shared.show_metric(m3, dashboard.latency_metric(per_image, "Latency saved per image", f"Measured on "
                                                     f"{saving.device}, batches of {saving.batch_size}: "
                                                     f"{saving.describe()}."))
    m4.metric("FLOPs executed", dashboard.percent(point.flops_fraction), "of the full network", delta_color="off",
              delta_arrow="off")
    _shared.latency_warning([*latencies.values(), saving])
    if saving.batch_size != batch:
        st.caption(f"Batch {batch} asked; the calibration set has {len(sweep.calib)} images, so batches of "
                   f"{saving.batch_size} are timed.")
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.pareto_figure(sweep, point, latencies, saving), key="pareto", width="stretch")
    c2.plotly_chart(figures.skip_rate_figure(point, net), key="skip_rate", width="stretch")
    st.caption(f"Latency: each threshold timed against the full network, {saving.describe()} "
               "over the calibration set's first images, drawn at the full network's median minus the paired "
               "saving; bars are the bootstrap 95 % interval of that saving.")
    columns = _shared.column_config(dashboard.calibration_columns())
    st.dataframe(dashboard.calibration_table(point, sweep.full, saving), hide_index=True, key="calib_summary",
                 column_config=columns)
    with st.expander("Every precomputed threshold"):
        st.dataframe(dashboard.sweep_table(sweep, latencies), hide_index=True, key="sweep_table",
                     column_config=columns)


live_view()
