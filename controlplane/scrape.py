"""Prometheus values read at scrape time, and the whole ``GET /metrics`` exposition (text
format 0.0.4): this process's instruments (:mod:`controlplane.metrics`), then what is read now.

Read from storage, flags and the billing plugin: ledger rows by state and reason, rollup
backlog and lag, the newest parity run, flag values, job health, the provider's 429 answers.
Every replica sharing a store reports the same storage values: take ``max`` over replicas, not
``sum``. The names, types and labels are listed in ``docs/reference/api.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from controlplane import health, rollup
from controlplane.errors import ControlPlaneError
from controlplane.flags import Authority

if TYPE_CHECKING:
    from controlplane.core import ControlPlane

log = structlog.get_logger("metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


async def exposition(cp: ControlPlane, *, watching_since: float | None) -> bytes:
    """The whole exposition: this process's instruments, then what is read now."""
    families = await scrape(cp, watching_since=watching_since)
    now = CollectorRegistry(auto_describe=False)
    now.register(_Families(families))
    return generate_latest(cp.metrics.registry) + generate_latest(now)


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


async def scrape(cp: ControlPlane, *, watching_since: float | None) -> list[Metric]:
    """Every value read at scrape time. A storage failure is reported as
    ``controlplane_storage_up 0`` with the values read before it, never as an error."""
    out: list[Metric] = []
    billing = cp.billing
    out.append(
        CounterMetricFamily(
            "controlplane_provider_throttled",
            "Rate-limit answers (HTTP 429) from the billing provider, retried ones included.",
            value=billing.throttled if billing is not None else 0,
        )
    )
    if cp.ingest_sources:
        sources = _gauge(
            "controlplane_ingest_source_up",
            "1 while an [[ingest]] source consumes normally, 0 while it keeps failing.",
            ["source"],
        )
        dead = CounterMetricFamily(
            "controlplane_ingest_dead_lettered",
            "Entries an [[ingest]] source set aside as invalid (its dead-letter stream).",
            labels=["source"],
        )
        for source in cp.ingest_sources:
            sources.add_metric([source.label], 0 if source.failing() else 1)
            dead.add_metric([source.label], source.dead_lettered)
        out.extend([sources, dead])
    up = _gauge("controlplane_storage_up", "1 when every storage read of this scrape succeeded.")
    try:
        await _read_storage(cp, out, watching_since)
        up.add_metric([], 1)
    except ControlPlaneError as exc:
        log.error("metrics.storage_failed", error=str(exc))
        up.add_metric([], 0)
    out.append(up)
    return out


async def _read_storage(cp: ControlPlane, out: list[Metric], watching_since: float | None) -> None:
    now = cp.clock()
    config = cp.config

    rows = _gauge(
        "controlplane_ledger_rows",
        "Ledger rows by state and reason (reason empty when the row has none).",
        ["state", "reason"],
    )
    for count in await cp.storage.ledger_counts():
        rows.add_metric([count.state, count.reason or ""], count.rows)
    out.append(rows)

    subscriptions = _gauge(
        "controlplane_org_subscriptions",
        "Orgs with a provider subscription, by its status (incomplete: not paid, not Pro).",
        ["status"],
    )
    for status, orgs in (await cp.storage.subscription_statuses()).items():
        subscriptions.add_metric([status], orgs)
    out.append(subscriptions)

    closed_before = rollup.watermark(now, config.rollup.grace_seconds)
    backlog = await cp.storage.dirty_backlog(closed_before, config.rollup.bucket_seconds)
    lag = 0.0
    if backlog.oldest_start is not None:
        lag = max(0.0, closed_before - (backlog.oldest_start + config.rollup.bucket_seconds))
    out.append(
        GaugeMetricFamily(
            "controlplane_rollup_backlog_buckets",
            "Closed (org, bucket) pairs with events the rollup has not folded in yet.",
            value=backlog.buckets,
        )
    )
    out.append(
        GaugeMetricFamily(
            "controlplane_rollup_held_buckets",
            "Closed (org, bucket) pairs the rollup holds: it cannot fold them (each alerted), "
            "their usage is in no ledger row.",
            value=backlog.held,
        )
    )
    out.append(
        GaugeMetricFamily(
            "controlplane_rollup_lag_seconds",
            "How long ago the oldest closed bucket still waiting for the rollup closed "
            "(0: none waits).",
            value=lag,
        )
    )

    flags = await cp.flags()
    out.append(
        GaugeMetricFamily(
            "controlplane_flag_shadow",
            "The shadow flag: 1 computes without sending.",
            value=int(flags.shadow),
        )
    )
    authority = _gauge(
        "controlplane_flag_authority", "1 for the biller the authority flag names.", ["authority"]
    )
    for value in Authority:
        authority.add_metric([value.value], int(flags.authority is value))
    out.append(authority)
    bill_from = _gauge(
        "controlplane_flag_bill_from_seconds",
        "The cutover boundary T in unix seconds (absent while unset).",
    )
    if flags.bill_from is not None:
        bill_from.add_metric([], flags.bill_from)
    out.append(bill_from)

    out.extend(await _parity(cp))
    out.extend(await _jobs(cp, now, watching_since))


async def _parity(cp: ControlPlane) -> list[Metric]:
    meter = cp.config.parity.meter
    labels = ["meter"]
    bucket = _gauge(
        "controlplane_parity_last_bucket_seconds",
        "Start of the newest bucket the parity checker compared.",
        labels,
    )
    drift = _gauge(
        "controlplane_parity_drift_units",
        "Newest checked bucket: control plane total minus legacy total, in the meter's units.",
        labels,
    )
    relative = _gauge(
        "controlplane_parity_relative_drift",
        "Newest checked bucket: abs(total drift) / abs(legacy total) (absent when legacy is 0).",
        labels,
    )
    mismatches = _gauge(
        "controlplane_parity_mismatching_orgs",
        "Newest checked bucket: orgs outside tolerance or on one side only.",
        labels,
    )
    alarming = _gauge(
        "controlplane_parity_alarming",
        "Newest checked bucket: 1 when its drift is material by the alert policy.",
        labels,
    )
    newest = await cp.storage.parity_runs(meter, limit=1)
    if newest:
        run = newest[0]
        difference = run.controlplane_micros - run.legacy_micros
        bucket.add_metric([meter], run.bucket_start)
        drift.add_metric([meter], difference / 1_000_000)
        if run.legacy_micros:
            relative.add_metric([meter], abs(difference) / abs(run.legacy_micros))
        mismatches.add_metric([meter], run.mismatches)
        alarming.add_metric([meter], int(run.alarming))
    return [bucket, drift, relative, mismatches, alarming]


async def _jobs(cp: ControlPlane, now: float, watching_since: float | None) -> list[Metric]:
    interval = _gauge("controlplane_job_interval_seconds", "How often each job runs.", ["job"])
    success = _gauge(
        "controlplane_job_last_success_seconds",
        "When each job's newest successful pass ended, unix seconds (absent: never).",
        ["job"],
    )
    failures = _gauge(
        "controlplane_job_failures_in_a_row",
        "Failed passes of each job up to its newest (counted up to a cap).",
        ["job"],
    )
    stale = _gauge(
        "controlplane_job_stale",
        "1 when the job has not succeeded within jobs.stale_after_intervals of its interval.",
        ["job"],
    )
    for status in await health.statuses(cp, now=now, watching_since=watching_since):
        interval.add_metric([status.job], status.interval_seconds)
        if status.last_success is not None:
            success.add_metric([status.job], status.last_success)
        failures.add_metric([status.job], status.failures)
        stale.add_metric([status.job], int(status.stale))
    return [interval, success, failures, stale]
