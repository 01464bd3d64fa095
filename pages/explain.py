"""Explain: Captum attributions for the full and the skipped run of the current image, side by side."""
from __future__ import annotations

import streamlit as st

from pages import _shared
from skipviz import dashboard, explain, figures

st.title(":material/lightbulb: Explain the current image")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
net = lm.net
cur = _shared.current_image()
if cur is not None:
    x, full_trace = _shared.prepared_input(model_key, cur.info.sha256, net, cur.image)
    policy = _shared.session_policy(lm)
    st.caption(f"Image: {cur.label}. Policy: {dashboard.describe_policy(policy)} (set on the Inspect / Thresholds "
               "pages).")
    methods = st.multiselect("Attribution maps", list(explain.MAP_METHODS), default=[explain.MAP_METHODS[0]],
                             key="explain_methods")
    if methods:
        with st.spinner("Computing attributions (Captum)..."):
            ex = explain.explain(net, x, policy, methods=methods)
        for m in methods:
            st.plotly_chart(figures.attribution_overlay(ex, m), key=f"overlay_{m}", width="stretch")
            for run in ("full", "skipped"):
                blank = figures.blank_map_reason(ex, m, run)
                if blank:
                    st.info(blank, icon=":material/visibility_off:")
            st.caption(explain.MAP_DESCRIPTIONS.get(m, ""))
        st.dataframe(ex.summary(), hide_index=True,
                     column_config=_shared.column_config(dashboard.fraction_columns(["topk_overlap", "top_k"], {
                         "topk_overlap": "top-k overlap", "top_k": "top-k (share of pixels)"})))
        if ex.importance is not None:
            st.plotly_chart(figures.importance_bars(ex.importance), key="importance", width="stretch")
            st.dataframe(ex.importance.to_dataframe(), hide_index=True,
                         column_config=_shared.column_config(dashboard.fraction_columns(["share"])))
        st.caption("Seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in ex.seconds.items()))
