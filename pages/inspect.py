"""Inspect (landing page): one image, which blocks fired, the prediction skipped vs full, measured latency."""
from __future__ import annotations

import streamlit as st

from pages import _shared
from skipviz import dashboard, figures, policies

st.title("🔍 Inspect one input")
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
            t = st.slider(f"Threshold (a block runs when its {policies.score_label(source)} >= threshold)", 0.0, 1.0,
                          value=_shared.session_threshold(lm, source), step=0.05,
                          key="inspect_threshold")
            st.session_state["sv_threshold"] = t
            ov = _shared.overrides()
            if ov:
                st.caption("Per-block overrides from the Thresholds page: " +
                           ", ".join(f"{net.block_names[k]}={v}" for k, v in sorted(ov.items())))
            policy = policies.make_policy(net, t, ov, source)
            res = dashboard.inspect(net, x, policy, full_trace, repeats=_shared.latency_repeats())
            tr, lat = res.trace, res.latency
            c1, c2, c3, c4 = st.columns(4)
            c1.metric("Prediction (skipped)", f"{tr.predicted_label}", f"{tr.confidence:.1%}", delta_color="off")
            c2.metric("Prediction (full)", f"{res.full_trace.predicted_label}",
                      f"{res.full_trace.confidence:.1%}", delta_color="off")
            c3.metric("Blocks fired", f"{tr.blocks_executed}/{tr.blocks_total}",
                      f"{tr.flops_saved_fraction:.1%} FLOPs saved", delta_color="off")
            c4.metric(f"Latency saved ({lat.device})", f"{lat.saved_ms:.2f} ms",
                      f"{lat.saved_fraction:.1%} of {lat.full_ms:.2f} ms", delta_color="off")
            if not res.agrees:
                st.warning(f"Skipping changed the prediction: {tr.predicted_label} (skipped) vs "
                           f"{res.full_trace.predicted_label} (full).")
            st.plotly_chart(figures.block_map_figure(tr), key="block_map", width="stretch")
            a, b = st.columns(2)
            with a:
                st.subheader("Top-5: skipped vs full")
                st.dataframe(dashboard.top5_side_by_side(res, net.meta.classes), hide_index=True,
                             column_config={"skipped: probability": st.column_config.ProgressColumn(
                                 format="%.3f", min_value=0, max_value=1),
                                 "full: probability": st.column_config.ProgressColumn(
                                 format="%.3f", min_value=0, max_value=1)}, key="top5")
            with b:
                st.plotly_chart(figures.latency_figure(lat), key="latency", width="stretch")
            st.subheader("Per-block decisions")
            st.dataframe(dashboard.block_table(tr, lat), hide_index=True, key="blocks",
                         column_config={policies.score_label(tr.policy): st.column_config.NumberColumn(format="%.3f"),
                                        "MFLOPs": st.column_config.NumberColumn(format="%.2f"),
                                        "latency (ms)": st.column_config.NumberColumn(format="%.3f")})
            st.caption(f"Latency measured on {lat.device}, batch 1, median of {lat.repeats} runs; per-block time "
                       "replays the skipped run's decisions (block or bypass, plus its gate; a plan decided at the "
                       "stem counts with the first block).")
            extra = _shared.inspect_extras()
            for render in extra:
                render(net, x, tr)

        live_view()
