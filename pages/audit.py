"""Audit: a batch of images (files or a zip) audited with a shadow full run, into this session's own database;
reports and the database to download."""
from __future__ import annotations

import json

import streamlit as st

from pages import _shared
from skipviz import audit, dashboard
from skipviz.audit import report, session

st.title(":material/fact_check: Audit a batch")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
net = lm.net
policy = _shared.session_policy(lm)

# the session's database: a path the server builds from a random token it keeps in this session, never one
# the browser names; other sessions' databases cannot be reached from here
try:
    if "sv_audit_token" not in st.session_state:
        st.session_state["sv_audit_token"] = session.new_session_token()
        session.prune_sessions(keep=st.session_state["sv_audit_token"])
    db_path = session.session_db_path(st.session_state["sv_audit_token"])
    runs = session.runs_table(db_path)
except (OSError, audit.StoreError) as e:  # e.g. the server's audit folder cannot be created or read
    st.error(f"The audit database cannot be opened: {e}. The server's audit folder is set by "
             f"${session.AUDIT_DIR_ENV}.", icon=":material/error:")
    st.stop()


def show_result(res: dict) -> None:
    """The last run: its summary first (accuracy and agreement with their intervals, FLOPs and time saved,
    failures), then the disagreements, every input (status and prediction first, identifiers last), downloads."""
    resumed = f" Resumed: {res['resumed']} inputs were already recorded." if res["resumed"] else ""
    st.success(f"Run {res['run_id']}: {len(res['frame'])} inputs, {res['ok']} audited, {res['failed']} failed, "
               f"{res['skipped']} skipped (not images); stored in this session's database.{resumed}",
               icon=":material/check_circle:")
    if res.get("summary"):
        for col, m in zip(st.columns(5), dashboard.audit_summary(res["summary"])):
            _shared.show_metric(col, m)
    if res["busy"]:  # the run's own words ("the machine is busy ...", "... timings are noisy")
        st.warning(f"{res['busy'][:1].upper()}{res['busy'][1:]}.", icon=":material/speed:")
    columns = _shared.column_config(dashboard.audit_columns())
    frame = res["frame"]
    disagreements = dashboard.audit_disagreements(frame)
    if len(disagreements):
        st.subheader(f"Disagreements with the full network ({len(disagreements)})")
        st.dataframe(disagreements, hide_index=True, key="audit_disagreements", column_config=columns)
    elif res["ok"]:
        st.caption("No disagreements: every input checked against the full network got its prediction.")
    st.subheader("Every input")
    st.caption("Disagreements first, then failed inputs, then the rest; the record and run ids, path and SHA-256 "
               "are in the last columns.")
    st.dataframe(dashboard.audit_records(frame), hide_index=True, key="audit_frame", column_config=columns)
    c1, c2, c3, c4, c5 = st.columns(5)
    stem = f"audit_{res['run_id']}"
    c1.download_button("Report (zip)", res["zip"], f"{stem}.zip", "application/zip", key="dl_zip",
                       icon=":material/folder_zip:", help="HTML, JSON and CSV with the charts' script: unpack and "
                                                          "open the HTML, also offline")
    c2.download_button("Report (HTML)", res["html"], f"{stem}.html", "text/html", key="dl_html",
                       icon=":material/description:", help="the charts need the script from the zip beside it")
    c3.download_button("Records (JSON)", res["json"], f"{stem}.json", "application/json", key="dl_json",
                       icon=":material/data_object:")
    c4.download_button("Records (CSV)", res["csv"], f"{stem}.csv", "text/csv", key="dl_csv",
                       icon=":material/table:")
    c5.download_button("Database (SQLite)", res["db"], "audit.sqlite", "application/vnd.sqlite3", key="dl_db",
                       icon=":material/database:")


failure = st.session_state.pop("audit_error", None)  # the last attempt failed: its reason, no earlier result
if failure:
    st.error(f"The audit failed: {failure}", icon=":material/error:")
result = st.session_state.get("audit_result")
if result:
    show_result(result)
    st.subheader("Another audit")

st.caption(f"Every image runs under the current policy ({dashboard.describe_policy(policy)}) and, as a shadow "
           "(on every input unless you choose a share below), the full network; each decision is stored in this session's own audit database on the server "
           f"(downloadable with each run's results, kept {session.SESSION_MAX_AGE_S // 86400} days), and so is the "
           "report.")
files = st.file_uploader("Images or a .zip archive", type=_shared.IMAGE_TYPES + ["zip"], accept_multiple_files=True,
                         key="audit_files")
labels = st.checkbox("Labels from folder names (zip archives)", value=False, key="audit_labels")
n_repro = st.number_input("Records to reproduce in the report", 0, 32, 4, key="audit_repro")
shadow_share = st.select_slider(
    "Inputs checked against the full network", options=[0.1, 0.25, 0.5, 1.0], value=1.0, key="audit_shadow",
    format_func=lambda f: "every input" if f >= 1.0 else f"{f:.0%} (chosen by SHA-256)",
    help="Each checked input also runs through the full network (the shadow run) to tell whether skipping "
         "changed its answer; a full-network output already kept in this session's database for the same bytes "
         "is reused. Checking a share makes large audits faster; the others are recorded as 'not checked' and "
         "the agreement is over the checked ones.")
interrupted = runs[runs["status"] == "interrupted"]
resume = False
if not interrupted.empty:
    last = interrupted.iloc[0]
    st.info(f"Run {last['run']} of this session was interrupted after {last['records']} inputs. Upload the same "
            "files and run with 'Resume' ticked to continue it: the files it already recorded are skipped, so "
            "each appears once.", icon=":material/history:")
    resume = st.checkbox("Resume the interrupted run", value=True, key="audit_resume")

if files and st.button("Run the audit", key="audit_run", icon=":material/play_arrow:"):
    bar = st.progress(0.0, text="Auditing...")
    try:
        run = audit.audit_uploaded_files([(f.name, f.getvalue()) for f in files], net, policy, db_path,
                                         labels_from_folders=labels, resume=resume,
                                         shadow=audit.ShadowPlan(float(shadow_share)),
                                         progress=lambda frac, text: bar.progress(min(1.0, float(frac)), text=text))
        repro = audit.reproduce_sample(run, net, k=int(n_repro))  # the network runs here; the report renders
        rendered = report.render_report(run, repro)
        bundle = report.report_bundle(run, repro, rendered=rendered)
        with audit.AuditStore(db_path) as store:
            database = store.snapshot()
    except (OSError, ValueError, audit.StoreError) as e:  # e.g. the server's audit folder is not writable
        bar.empty()
        st.session_state.pop("audit_result", None)  # the previous run's result (drawn above) is not this attempt's
        st.session_state["audit_error"] = str(e)
        st.rerun()
    else:
        bar.empty()
        html, js, csv = rendered
        st.session_state["audit_result"] = {
            "run_id": run.run_id, "html": html, "json": js, "csv": csv, "zip": bundle, "db": database,
            "frame": run.dataframe(), "ok": len(run.ok_records), "failed": len(run.failed_records),
            "summary": json.loads(js)["summary"],  # the report's own numbers, computed once by render_report
            "skipped": len(run.skipped_records), "resumed": run.resumed, "busy": (run.latency or {}).get("busy")}
        st.rerun()  # the runs table and the resume offer follow the finished run

if not runs.empty:
    st.subheader("Runs in this session's database")
    if "policy" in runs.columns:  # in words, not a dict
        runs = runs.assign(policy=runs["policy"].map(dashboard.policy_words))
    st.dataframe(runs, hide_index=True, key="audit_runs")
