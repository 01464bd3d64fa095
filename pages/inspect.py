"""Inspect (landing page): one image, which blocks fired, the prediction skipped vs full, the measured latency
saving at a chosen batch size (paired rounds, said only as far as its interval allows)."""
from __future__ import annotations

import streamlit as st

from pages import _shared
from skipviz import dashboard, figures, policies

st.title(":material/search: Inspect one input")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
net = lm.net

left, right = st.columns([1, 2])
with left:
    _shared.image_picker()
    cur = _shared.current_image()
    if cur is not None:
        st.image(cur.image, caption=f"{cur.label}: {cur.info.width}x{cur.info.height} {cur.info.format}"
                                    f"{f', {cur.info.frames} frames (first used)' if cur.info.frames > 1 else ''}",
                 width=240)
        st.caption(f"SHA-256 {cur.info.sha256[:16]}...")

if cur is not None:
    x, full_trace = _shared.prepared_input(model_key, cur.info.sha256, net, cur.image)
    with right:
        @st.fragment
        def live_view() -> None:
            source = _shared.source_picker(lm, "inspect_source")
            t = _shared.threshold_slider(lm, source, "inspect")
            ov = _shared.overrides(net)
            if ov:
                st.caption(f"Per-block overrides from the Thresholds page: {dashboard.describe_overrides(net, ov)}.")
                _shared.shape_warning(net, ov)
            b_col, again_col = st.columns([3, 1])
            with b_col:
                batch = _shared.batch_picker("inspect_batch")
            again = again_col.button("Measure again", key="inspect_measure_again", icon=":material/refresh:")
            policy = policies.make_policy(net, t, ov, source)
            res = dashboard.inspect(net, x, policy, full_trace)
            live = _shared.live_latency(model_key, cur.info.sha256, lm, x, policy, batch, again)
            tr, saving = res.trace, live.saving
            c1, c2, c3, c4 = st.columns(4)
            c1.metric("Prediction (skipped)", f"{tr.predicted_label}", dashboard.percent(tr.confidence),
                      delta_color="off", delta_arrow="off")
            c2.metric("Prediction (full)", f"{res.full_trace.predicted_label}",
                      dashboard.percent(res.full_trace.confidence), delta_color="off", delta_arrow="off")
            c3.metric("Blocks fired", f"{tr.blocks_executed}/{tr.blocks_total}",
                      f"{dashboard.percent(tr.flops_saved_fraction)} FLOPs saved", delta_color="off", delta_arrow="off")
            c4.metric(f"Latency saved ({live.device}, batch {batch})", saving.headline(), saving.detail(),
                      delta_color="off", delta_arrow="off")
            _shared.latency_warning(saving)
            if not res.agrees:
                st.warning(f"Skipping changed the prediction: {tr.predicted_label} (skipped) vs "
                           f"{res.full_trace.predicted_label} (full).")
            st.plotly_chart(figures.block_map_figure(tr), key="block_map", width="stretch")
            a, b = st.columns(2)
            with a:
                st.subheader("Top-5: skipped vs full")
                st.dataframe(dashboard.top5_side_by_side(res, net.meta.classes), hide_index=True,
                             column_config={"skipped: probability": st.column_config.ProgressColumn(
                                 format="percent", min_value=0, max_value=1),
                                 "full: probability": st.column_config.ProgressColumn(
                                 format="percent", min_value=0, max_value=1)}, key="top5")
            with b:
                st.plotly_chart(figures.latency_figure(saving), key="latency", width="stretch")
            st.caption(f"Latency: {saving.describe()} (full and skipped alternating, each round's difference "
                       f"paired; the saving is their median with a bootstrap 95 % interval). Batch: {live.batch}.")
            st.subheader("Per-block decisions")
            time_col = dashboard.profile_column(live.profile_device, live.batch_size)
            st.dataframe(dashboard.block_table(tr, live.block_ms, live.profile_device, live.batch_size),
                         hide_index=True, key="blocks",
                         column_config={policies.score_label(tr.policy): st.column_config.NumberColumn(format="%.3f"),
                                        "MFLOPs": st.column_config.NumberColumn(format="%.2f"),
                                        time_col: st.column_config.NumberColumn(format="%.3f")})
            st.caption(f"Per-block time is a profile estimate, not a measurement of this run: every block, bypass "
                       f"and gate timed alone at batch {live.batch_size} on {live.profile_device}, scaled to the "
                       "measured forward and combined for this batch's decisions (a plan decided at the stem counts "
                       "with the first block). The measured figure is the paired saving above.")
            extra = _shared.inspect_extras()
            for render in extra:
                render(net, x, tr)

        live_view()
