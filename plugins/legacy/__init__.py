"""Legacy plugins."""
