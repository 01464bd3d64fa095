"""Inspect (landing page): one image, which blocks fired, the prediction skipped vs full, the measured latency
saving at a chosen batch size (paired rounds, said only as far as its interval allows).

Laid out so that at 1280 px the image, the controls and the prediction (top-5, skipped vs full) are in the first
screen, and the block table opens with the decision, its reason, the FLOPs and the time of each block."""
from __future__ import annotations

import streamlit as st

from pages import _shared
from skipviz import dashboard, figures, policies

st.title(":material/search: Inspect one input")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
net = lm.net


@st.fragment
def live_view() -> None:
    left, right = st.columns([1, 2], gap="medium")
    with left:
        _shared.image_picker()
        cur = _shared.current_image()
        if cur is not None:
            st.image(cur.image, caption=dashboard.image_caption(cur.label, cur.info, cur.image.size), width=220)
            st.caption(f"SHA-256 {cur.info.sha256[:16]}...")
    if cur is None:
        return
    x, full_trace = _shared.prepared_input(model_key, cur.info.sha256, net, cur.image)
    with right:
        source = _shared.source_picker(lm, "inspect_source")
        t = _shared.threshold_slider(lm, source, "inspect")
        ov = _shared.overrides(net)
        if ov:
            st.caption(f"Per-block overrides from the Thresholds page: {dashboard.describe_overrides(net, ov)}.")
            _shared.shape_warning(net, ov)
        b_col, again_col = st.columns([3, 2], vertical_alignment="bottom")
        with b_col:
            batch = _shared.batch_picker("inspect_batch")
        again = again_col.button("Measure again", key="inspect_measure_again", icon=":material/refresh:")
        policy = policies.make_policy(net, t, ov, source)
        res = dashboard.inspect(net, x, policy, full_trace)
        tr = res.trace
        if res.agrees:
            st.markdown(f":material/check_circle: {dashboard.prediction_verdict(res)}")
        else:
            st.warning(dashboard.prediction_verdict(res), icon=":material/compare_arrows:")
        st.dataframe(dashboard.top5_side_by_side(res, net.meta.classes), hide_index=True, key="top5",
                     column_config=_shared.column_config(dashboard.top5_columns()))
    # the decisions first: the block map is on screen before the latency is timed (block profile and paired
    # rounds: about 4.5 s of the first view of the ImageNet default on the 2-core CPU, issue 17's <= 5 s target)
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.metric("Blocks fired", f"{tr.blocks_executed}/{tr.blocks_total}",
              f"{tr.blocks_total - tr.blocks_executed} bypassed", delta_color="off", delta_arrow="off")
    c2.metric("FLOPs saved", dashboard.percent(tr.flops_saved_fraction),
              f"{tr.flops_executed / 1e6:.1f} of {tr.flops_full / 1e6:.1f} MFLOPs run", delta_color="off",
              delta_arrow="off")
    latency_slot = c3.empty()
    if net.num_blocks > 10:  # a long block map gets the whole width, the latency chart a row of its own
        st.plotly_chart(figures.block_map_figure(tr), key="block_map", width="stretch")
        a, b = st.columns([2, 3], vertical_alignment="center")
    else:
        a, b = st.columns([3, 2])
        a.plotly_chart(figures.block_map_figure(tr), key="block_map", width="stretch")
    live = _shared.live_latency(model_key, cur.info.sha256, lm, x, policy, batch, again)
    saving = live.saving
    _shared.show_metric(latency_slot, dashboard.latency_metric(saving, "Latency saved", f"Per batch of {batch}, "
                                                               f"measured on {live.device}: {saving.describe()}."))
    _shared.latency_warning(saving)
    words = (f"Latency: {saving.describe()} (full and skipped alternating, each round's difference paired; the "
             f"saving is their median with a bootstrap 95 % interval). Batch: {live.batch}.")
    if net.num_blocks > 10:
        a.plotly_chart(figures.latency_figure(saving), key="latency", width="stretch")
        b.caption(words)
    else:
        b.plotly_chart(figures.latency_figure(saving), key="latency", width="stretch")
        st.caption(words)
    st.subheader("Per-block decisions")
    time_col = dashboard.profile_column(live.profile_device, live.batch_size)
    st.dataframe(dashboard.block_table(tr, live.block_ms, live.profile_device, live.batch_size),
                 hide_index=True, key="blocks", height=35 * (net.num_blocks + 1) + 3,  # every block, no scrolling
                 column_config=_shared.column_config(dashboard.block_columns(tr.policy, time_col)))
    st.caption(f"ms (est.): a profile estimate per batch of {live.batch_size} on {live.profile_device}, not a "
               "measurement of this run: every block, bypass and gate timed alone, scaled to the measured forward "
               "and combined for this batch's decisions (a plan decided at the stem counts with the first block). "
               "The measured figure is the paired saving above.")
    for render in _shared.inspect_extras():
        render(net, x, tr)


live_view()
