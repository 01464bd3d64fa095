"""skipviz.figures_audit: the audit report's figures build without Streamlit, every axis with its unit, and are
importable from skipviz.figures (where the report takes them from)."""
from __future__ import annotations

import plotly.graph_objects as go

from skipviz import figures, figures_audit
from skipviz.audit.report import skip_rate_per_block, skip_rate_per_class, summarize
from test_dashboard_tables import audit_run


def test_every_audit_figure_says_its_units():
    run = audit_run()
    per_block = skip_rate_per_block(run.records)
    _, by_block = skip_rate_per_class(run.records)
    s = summarize(run)
    block = figures_audit.fig_skip_rate_per_block(per_block)
    assert "(%)" in block.layout.yaxis.title.text and block.layout.yaxis.tickformat == ".0%"
    per_class = figures_audit.fig_skip_rate_per_class(by_block)
    assert per_class.layout.xaxis.title.text == "block" and per_class.layout.yaxis.title.text == "class"
    assert "(%)" in per_class.data[0].colorbar.title.text
    flops = figures_audit.fig_flops_saved(run.records)
    assert "%" in flops.layout.xaxis.title.text and "count" in flops.layout.yaxis.title.text
    throughput = figures_audit.fig_throughput(s["throughput"])
    assert throughput.layout.yaxis.title.text == "throughput (images/s)"
    agreement = figures_audit.fig_agreement(s)
    assert "(%)" in agreement.layout.yaxis.title.text
    assert all(isinstance(f, go.Figure) for f in (block, per_class, flops, throughput, agreement))


def test_the_report_takes_them_from_skipviz_figures():
    assert all(getattr(figures, n) is getattr(figures_audit, n) for n in figures_audit.__all__)
