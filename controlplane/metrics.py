"""Prometheus metrics updated in process: events ingested, duplicates and rejected; ingest
requests refused; calls to the billing provider by outcome and their duration.

Each :class:`Metrics` has its own ``CollectorRegistry`` (one per
:class:`~controlplane.core.ControlPlane`), so nothing is shared between apps or tests. Sum them
over replicas. ``GET /metrics`` serves them followed by the values read at scrape time
(:mod:`controlplane.scrape`). The names, types and labels are listed in
``docs/reference/api.md`` (``GET /metrics``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controlplane.interfaces import IngestResult, Outcome, ReconcileRun

SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REFUSALS = ("too_large", "rate_limited")
MAX_TYPE_LABELS = 100  # event types are the client's: a bounded number of series


class Metrics:
    """The in-process instruments of one control plane, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_ingested = Counter(
            "controlplane_events_ingested",
            "Usage events stored (after deduplication), by ingest source.",
            ["source"],
            registry=r,
        )
        self.events_duplicate = Counter(
            "controlplane_events_duplicate",
            "Usage events answered as duplicates of stored ones (not stored again).",
            ["source"],
            registry=r,
        )
        self.events_rejected = Counter(
            "controlplane_events_rejected",
            "Usage events in batches refused as invalid; none of such a batch is stored.",
            ["source"],
            registry=r,
        )
        self.events_unmetered = Counter(
            "controlplane_events_unmetered",
            "Usage events of a type no meter reads (stored, never billed), by type; counted "
            f"per valid batch, redeliveries included; types past the first {MAX_TYPE_LABELS} "
            "are counted as `other`.",
            ["type"],
            registry=r,
        )
        self._type_labels: set[str] = set()
        self.ingest_refused = Counter(
            "controlplane_ingest_refused",
            "POST /v1/events requests refused before validation (too_large: 413, "
            "rate_limited: 429).",
            ["reason"],
            registry=r,
        )
        self.sends = Counter(
            "controlplane_sends",
            "Meter events handed to the billing provider, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.send_seconds = Histogram(
            "controlplane_send_duration_seconds",
            "Time to deliver one meter event, the billing plugin's own retries included.",
            ["outcome"],
            buckets=SEND_BUCKETS,
            registry=r,
        )
        self.reconcile_short = Gauge(
            "controlplane_reconcile_units_short",
            "Units the ledger sent that the provider did not hold (under billing), in the "
            "newest reconciliation.",
            registry=r,
        )
        self.reconcile_over = Gauge(
            "controlplane_reconcile_units_over",
            "Units the provider held that the ledger did not send (double billing), in the "
            "newest reconciliation.",
            registry=r,
        )
        self.reconcile_clean_at = Gauge(
            "controlplane_reconcile_last_clean_timestamp_seconds",
            "When the newest clean reconciliation ran (unix seconds; 0: none yet).",
            registry=r,
        )
        self.untokened_events = Counter(
            "controlplane_events_untokened",
            "Events of a `[capabilities] required_for` type that carried no capability token: "
            "refused (the control plane is the billing authority) or would_refuse (it is not "
            "yet), by type.",
            ["type", "outcome"],
            registry=r,
        )
        self.provider_errors = Counter(
            "controlplane_provider_errors",
            "Meter events the billing provider accepted, then reported invalid (Stripe error "
            "reports and no-meter-found thin events), by the provider's error code.",
            ["code"],
            registry=r,
        )
        self.gauge_resets = Counter(
            "controlplane_series_snapshot_resets",
            "Gauge snapshots (level events) that disagreed with the level the deltas before "
            "them added up to, and reset it (snapshots are authoritative).",
            registry=r,
        )
        self.unplanned_rows = Counter(
            "controlplane_rollup_unplanned_rows",
            "Ledger rows excluded as free only because their org has no plan from any source "
            "(no capability token, no plan stored here, no legacy biller's answer).",
            registry=r,
        )
        for reason in REFUSALS:
            self.ingest_refused.labels(reason)
        for outcome in Outcome:
            self.sends.labels(outcome.value)
            self.send_seconds.labels(outcome.value)

    # updates --------------------------------------------------------------------------------

    def ingested(self, source: str, result: IngestResult) -> None:
        self.events_ingested.labels(source).inc(result.accepted)
        self.events_duplicate.labels(source).inc(result.duplicates)
        if result.unmetered:
            self.unmetered(result)

    def unmetered(self, result: IngestResult) -> None:
        """Count a batch's unmetered events: its listed types by name (the first
        :data:`MAX_TYPE_LABELS` types seen), the rest as `other`."""
        other = result.unmetered
        for event_type, events in result.unmetered_types.items():
            if event_type not in self._type_labels and len(self._type_labels) < MAX_TYPE_LABELS:
                self._type_labels.add(event_type)
            if event_type in self._type_labels:
                self.events_unmetered.labels(event_type).inc(events)
                other -= events
        if other:
            self.events_unmetered.labels("other").inc(other)

    def rejected(self, source: str, events: int) -> None:
        self.events_rejected.labels(source).inc(events)

    def refused(self, reason: str) -> None:
        self.ingest_refused.labels(reason).inc()

    def reconciled(self, run: ReconcileRun) -> None:
        self.reconcile_short.set(run.units_short)
        self.reconcile_over.set(run.units_over)
        if run.clean:
            self.reconcile_clean_at.set(run.checked_at)

    def untokened(self, event_type: str, refused: bool) -> None:
        """An event of a required type without a token (types are configured: bounded)."""
        outcome = "refused" if refused else "would_refuse"
        self.untokened_events.labels(event_type[:100], outcome).inc()

    def provider_error(self, code: str, events: int) -> None:
        self.provider_errors.labels(code).inc(events)

    def sent(self, outcome: Outcome, seconds: float) -> None:
        self.sends.labels(outcome.value).inc()
        self.send_seconds.labels(outcome.value).observe(seconds)
