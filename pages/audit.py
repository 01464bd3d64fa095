"""Audit: a batch of images (files or a zip) audited with a shadow full run; reports to download."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import streamlit as st

from pages import _shared
from skipviz import audit
from skipviz.audit import report

st.title("📋 Audit a batch")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
net = lm.net
policy = _shared.session_policy(lm)
st.caption(f"Every image runs under the current policy {policy.config()} and, as a shadow, the full network; "
           "each decision is stored in SQLite and the report can be downloaded (HTML, JSON, CSV).")
db_default = os.environ.get("SKIPVIZ_AUDIT_DB", str(Path(tempfile.gettempdir()) / "skipviz_dashboard_audit.sqlite"))
db_path = st.text_input("Audit database (SQLite file)", db_default, key="audit_db")
files = st.file_uploader("Images or a .zip archive", type=_shared.IMAGE_TYPES + ["zip"], accept_multiple_files=True,
                         key="audit_files")
labels = st.checkbox("Labels from folder names (zip archives)", value=False, key="audit_labels")
n_repro = st.number_input("Records to reproduce in the report", 0, 32, 4, key="audit_repro")
if files and st.button("Run the audit", key="audit_run"):
    bar = st.progress(0.0, text="Auditing...")
    try:
        run = audit.audit_uploaded_files([(f.name, f.getvalue()) for f in files], net, policy, db_path,
                                         labels_from_folders=labels,
                                         progress=lambda frac, text: bar.progress(min(1.0, float(frac)), text=text))
        repro = audit.reproduce_sample(run, net, k=int(n_repro))  # the network runs here; the report renders
        html, js, csv = report.render_report(run, repro)
    except (OSError, ValueError, audit.StoreError) as e:  # bad uploads, archives or database paths
        bar.empty()
        st.session_state.pop("audit_result", None)  # the previous run's result is not this attempt's
        st.error(f"The audit failed: {e}")
    else:
        bar.empty()
        st.session_state["audit_result"] = {"run_id": run.run_id, "html": html, "json": js, "csv": csv,
                                            "frame": run.dataframe(), "failed": len(run.failed_records),
                                            "db_path": str(run.db_path)}
res = st.session_state.get("audit_result")
if res:
    st.success(f"Run {res['run_id']}: {len(res['frame'])} inputs ({res['failed']} failed) stored in "
               f"{res['db_path']}.")
    st.dataframe(res["frame"], hide_index=True)
    c1, c2, c3 = st.columns(3)
    c1.download_button("Report (HTML)", res["html"], f"audit_{res['run_id']}.html", "text/html", key="dl_html")
    c2.download_button("Records (JSON)", res["json"], f"audit_{res['run_id']}.json", "application/json",
                       key="dl_json")
    c3.download_button("Records (CSV)", res["csv"], f"audit_{res['run_id']}.csv", "text/csv", key="dl_csv")
