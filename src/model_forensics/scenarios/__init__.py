"""Incident scenarios with ground truth: zoo models and real weights."""
