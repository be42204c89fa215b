"""Ingest plugins."""
