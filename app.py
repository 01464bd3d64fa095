"""SkipViz dashboard entry point: ``streamlit run app.py``.

Pages live in ``pages/`` and are listed here with ``st.navigation``; a page backed by an optional module
(redundancy/explanations, audit) is listed only when that module is importable.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pages import _shared  # noqa: E402
from skipviz import views  # noqa: E402

st.set_page_config(page_title="SkipViz", page_icon="⏭️", layout="wide")


def _available(*modules_and_names: tuple[str, tuple[str, ...]]) -> bool:
    """Whether every module imports and has the named attributes."""
    for module, names in modules_and_names:
        try:
            mod = importlib.import_module(module)
        except Exception:  # a missing or broken optional module leaves its page out of navigation
            return False
        if not all(hasattr(mod, n) for n in names):
            return False
    return True


pages = [
    st.Page("pages/inspect.py", title="Inspect", icon="🔍", default=True),
    st.Page("pages/thresholds.py", title="Thresholds", icon="🎚️"),
]
for spec in _shared.optional_pages():
    if _available(*spec["requires"]):
        pages.append(st.Page(spec["path"], title=spec["title"], icon=spec["icon"]))
pages.append(st.Page("pages/model.py", title="Model", icon="🧠"))

nav = st.navigation(pages)

model_key, lm = _shared.current_model()
with st.sidebar:
    st.caption(f"Model: **{lm.net.meta.display_name}**")
    st.caption(f"Device: {views.device_label()}")
    if lm.warning:
        st.caption("⚠️ trained weights missing: random init")
nav.run()
