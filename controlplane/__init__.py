"""Metering and billing control plane.

Usage events come in through ingest plugins, land in a storage plugin, are rolled up into
per-org, per-meter, per-bucket totals in a durable ledger, and are sent to a billing provider
as idempotent meter events, gated by the cutover flags.
"""

__version__ = "0.1.0"
