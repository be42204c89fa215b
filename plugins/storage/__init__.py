"""Storage plugins."""
