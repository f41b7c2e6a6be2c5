"""Offline reports: the one-file interactive report and the analysis figures (matplotlib)."""

from model_forensics.report.analysis import analysis_html, write_analysis_report
from model_forensics.report.html import report_data, report_html, write_report

__all__ = ["analysis_html", "report_data", "report_html", "write_analysis_report", "write_report"]
