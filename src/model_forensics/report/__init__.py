"""Offline reports and figures (matplotlib)."""

from model_forensics.report.analysis import analysis_html, write_analysis_report

__all__ = ["analysis_html", "write_analysis_report"]
