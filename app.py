"""SkipViz dashboard entry point: ``streamlit run app.py``.

Pages live in ``pages/`` and are listed here with ``st.navigation``. Each page imports what it needs, so the
heavier modules (Captum, scipy) load when their page is first opened, not before the first prediction.
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pages import _shared  # noqa: E402
from skipviz.measure import clock  # noqa: E402

st.set_page_config(page_title="SkipViz", page_icon=":material/skip_next:", layout="wide")


PAGES = [
    st.Page("pages/inspect.py", title="Inspect", icon=":material/search:", default=True),
    st.Page("pages/thresholds.py", title="Thresholds", icon=":material/tune:"),
    st.Page("pages/redundancy.py", title="Redundancy", icon=":material/extension:"),
    st.Page("pages/explain.py", title="Explain", icon=":material/lightbulb:"),
    st.Page("pages/audit.py", title="Audit", icon=":material/fact_check:"),
    st.Page("pages/model.py", title="Model", icon=":material/neurology:"),
]

nav = st.navigation(PAGES)

model_key, lm = _shared.current_model()
with st.sidebar:
    st.caption(f"Model: **{lm.net.meta.display_name}**")
    st.caption(f"Device: {clock.device_label()}")
    if lm.warning:
        st.caption(":material/warning: no trained weights (random init): predictions are meaningless")
nav.run()
