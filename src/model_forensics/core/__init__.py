"""Shared pieces with no torch-model knowledge: sites, config, bundle format, provenance."""
