"""Figures and summaries drawn from a merge's merge_report.json (``tadmerge report OUT``)."""

from tadmerge.report.plots import (
    classify,
    draw_report,
    drop_rates,
    load_report,
    render_report,
    summarize,
)

__all__ = ["classify", "draw_report", "drop_rates", "load_report", "render_report", "summarize"]
