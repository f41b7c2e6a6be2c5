"""Offline reports and figures (matplotlib)."""
