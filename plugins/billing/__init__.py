"""Billing plugins."""
