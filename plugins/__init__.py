"""Swappable implementations of the contracts in :mod:`controlplane.interfaces`."""
