"""SkipViz dashboard entry point: ``streamlit run app.py``.

Streamlit runs this file as the page script of every session (``__name__ == "__main__"``): :func:`main` lists the
pages in ``pages/`` with ``st.navigation``; each page imports what it needs, so the heavier modules (Captum,
scipy) load when their page is first opened. Before that, ``streamlit run app.py`` imports the file to find its
server application (``app``, an ``st.App``): its start-up hook loads the default model in a background thread
(:func:`pages._shared.warm_default_model`), so the first page request does not wait for torch, timm and the
weights. The server answers at once; a request that comes before the model is ready waits for it.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from pages import _shared
    from skipviz.measure import clock

    st.set_page_config(page_title="SkipViz", page_icon=":material/skip_next:", layout="wide")
    nav = st.navigation([
        st.Page("pages/inspect.py", title="Inspect", icon=":material/search:", default=True),
        st.Page("pages/thresholds.py", title="Thresholds", icon=":material/tune:"),
        st.Page("pages/redundancy.py", title="Redundancy", icon=":material/extension:"),
        st.Page("pages/explain.py", title="Explain", icon=":material/lightbulb:"),
        st.Page("pages/audit.py", title="Audit", icon=":material/fact_check:"),
        st.Page("pages/model.py", title="Model", icon=":material/neurology:"),
    ])
    model_key, lm = _shared.current_model()
    with st.sidebar:
        st.caption(f"Model: **{lm.net.meta.display_name}**")
        st.caption(f"Device: {clock.device_label()}")
        if lm.warning:
            st.caption(":material/warning: no trained weights (random init): predictions are meaningless")
    nav.run()


def _warm() -> None:
    from pages import _shared

    _shared.warm_default_model_logged()


@contextlib.asynccontextmanager
async def _warm_on_start(_app):
    threading.Thread(target=_warm, name="skipviz-warm-default-model", daemon=True).start()
    yield


if __name__ == "__main__":  # a session's run of the page script
    main()
elif hasattr(st, "App"):  # `streamlit run app.py` imports the file to find its server application (Streamlit
    app = st.App("app.py", lifespan=_warm_on_start)  # without st.App runs the page script only: no warm-up)
