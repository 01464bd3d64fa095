"""Redundancy: which blocks repeat each other (data-set KL heatmap), and the KL-redundancy skip policy."""
from __future__ import annotations

import streamlit as st

from pages import _shared
from skipviz import dashboard, figures, redundancy, policies
from skipviz.evaluate import calibration

st.title(":material/extension: Inter-layer redundancy")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
net = lm.net
source = _shared.decision_source(net)  # the comparison row follows the session's decisions (Inspect, Thresholds)
sweep = _shared.calibration_sweep(model_key, lm, source)
calib = sweep.calib

methods = redundancy.available_methods(net)
c1, c2 = st.columns(2)
method = c1.radio("Definition", methods, format_func=lambda m: m.capitalize() + " KL", horizontal=True,
                  key="red_method")
divergence = c2.radio("Divergence", list(redundancy.DIVERGENCES), format_func=str.upper, horizontal=True,
                      key="red_divergence")
st.caption(redundancy.METHOD_DESCRIPTIONS[method] + " " + redundancy.DIVERGENCE_DESCRIPTIONS[divergence])
st.caption(f"Data: {calib.source}.")


@st.cache_resource(max_entries=16, show_spinner="Computing divergences over the calibration set...")
def _stats(key: str, method: str, divergence: str, _net, _calib) -> redundancy.RedundancyStats:
    return redundancy.dataset_redundancy(_net, calibration.calibration_dataset(_calib), method, divergence)


stats = _stats(f"{model_key}:{len(calib)}", method, divergence, net, calib)
a, b = st.columns(2)
a.plotly_chart(figures.kl_heatmap(stats.mean_matrix, stats.block_names, divergence, method,
                                  title=f"Mean {divergence.upper()} over {stats.n} images ({method})"),
               key="dataset_heatmap", width="stretch")
b.plotly_chart(figures.adjacent_kl_series(stats), key="adjacent_series", width="stretch")

st.subheader("KL-redundancy policy")
st.caption("Each block is scored by the mean KL between its input and output distributions over the calibration "
           "set; scores are normalised into (0, 1), a Beta distribution is fitted, and blocks scoring below its "
           "q quantile are skipped for every input (Efficient Layer Attention, arXiv 2503.06473).")


@st.cache_resource(max_entries=8, show_spinner="Calibrating the KL policy...")
def _kl_policy(key: str, method: str, _net, _calib) -> policies.KLRedundancyPolicy:
    return policies.KLRedundancyPolicy.calibrate(_net, calibration.calibration_dataset(_calib), q=0.3, method=method)


base = _kl_policy(f"{model_key}:{len(calib)}", method, net, calib)


@st.fragment
def policy_view() -> None:
    q = st.slider("Quantile q (higher skips more blocks)", 0.0, 1.0, 0.3, 0.05, key="kl_q")
    policy = base.with_q(q)
    st.plotly_chart(figures.kl_policy_scores(policy), key="kl_scores", width="stretch")
    kl_point = calibration.evaluate_calibration(net, calib, policy, sweep.full.predictions)
    t = _shared.session_threshold(lm, source)
    ov = _shared.overrides(net)
    current = sweep.point_for(net, t, ov)
    st.dataframe(calibration.compare_points({f"KL policy (q={q:.2f})": kl_point,
                                             dashboard.compared_policy_label(source, t, ov): current,
                                             "full": sweep.full}),
                 hide_index=True, column_config=_shared.column_config(dashboard.compare_columns()))
    if ov:
        st.caption(f"The session's per-block overrides (Thresholds page) are in force in the {source} row: "
                   f"{dashboard.describe_overrides(net, ov)}.")
    st.dataframe(policy.to_dataframe(), hide_index=True, column_config=_shared.column_config(dashboard.kl_policy_columns()))


policy_view()
