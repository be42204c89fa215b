"""Health of the scheduled jobs: readiness, and alerts for a job that fails or stalls.

Every pass of a job is recorded (:meth:`controlplane.core.ControlPlane.record`); a pass that
ends `ok` or `skipped` is a *success*. From those records:

- a job is **stale** when it has not succeeded within ``jobs.stale_after_intervals`` of its
  interval. The clock starts at the job's last success, or at the moment this process began
  running the jobs if that is later (so a restart gets a full allowance). ``/readyz`` answers
  503 naming each stale job, in processes that run the jobs.
- a job is **failing** when its newest ``jobs.alert_after_failures`` passes all failed.

The watcher (``serve`` runs it every ``jobs.watch_interval_seconds``) raises an alert for each
stale or failing job: logged as ``jobs.alert`` and POSTed to ``parity.alert.webhook_url`` as
``{"text", "dedup_key"}``, the same delivery (and retries) as parity alerts, unless an alert for
that job was raised within ``jobs.suppress_seconds``. Alerts are stored beside parity alerts
under the key ``job:<name>``.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import msgspec
import structlog

from controlplane.interfaces import WEBHOOK_ALERTS, ParityAlert
from controlplane.invoices import UNSURE_ALERTS
from controlplane.parity_checker import ACTIVE_STATES, deliver_pending
from controlplane.reconcile import RECONCILE_ALERTS
from controlplane.rollup import HELD_ALERTS

if TYPE_CHECKING:
    from controlplane.config import Config
    from controlplane.core import ControlPlane

log = structlog.get_logger("jobs")

COUNTED_FAILURES = 20  # consecutive failures are counted up to this (or alert_after_failures)


class JobStatus(msgspec.Struct, frozen=True):
    """One scheduled job's health at `now`."""

    job: str
    interval_seconds: float
    last_success: float | None  # when its newest successful pass ended
    failures: int  # failed passes in a row, up to the newest (counted up to a cap)
    last_error: str | None  # the newest failure's error, when the newest pass failed
    stale_after_seconds: float | None  # None: staleness is not checked
    stale_since: float | None  # when it became stale; None while it is not

    @property
    def stale(self) -> bool:
        return self.stale_since is not None

    def to_api(self) -> dict[str, object]:
        return {
            "status": "stale" if self.stale else "failing" if self.failures else "ok",
            "last_success": self.last_success,
            "stale_since": self.stale_since,
            "stale_after_seconds": self.stale_after_seconds,
            "failures_in_a_row": self.failures,
            "last_error": self.last_error,
        }


class WatchStats(msgspec.Struct):
    unhealthy: int = 0
    alerts: int = 0
    suppressed: int = 0
    delivered: int = 0
    failed: int = 0


def scheduled_jobs(config: Config, *, legacy: bool, reconcile: bool = False) -> dict[str, float]:
    """The jobs `serve` runs and their intervals in seconds (parity only with a legacy source,
    reconcile only with a billing plugin that reads the provider's aggregates)."""
    jobs = {"rollup": config.rollup.interval_seconds, "send": config.sender.interval_seconds}
    if legacy:
        jobs["parity"] = config.parity.interval_seconds
    if reconcile and config.reconcile.interval_seconds > 0:
        jobs["reconcile"] = config.reconcile.interval_seconds
    return jobs


def alert_key(job: str) -> str:
    return f"job:{job}"


async def statuses(
    cp: ControlPlane, *, now: float, watching_since: float | None
) -> list[JobStatus]:
    """The health of every scheduled job. `watching_since`: when this process began running
    the jobs (None: it does not run them, and a job that never succeeded is not judged)."""
    config = cp.config.jobs
    limit = max(config.alert_after_failures, COUNTED_FAILURES)
    out: list[JobStatus] = []
    jobs = scheduled_jobs(cp.config, legacy=cp.legacy is not None, reconcile=cp.reconciles)
    for job, interval in jobs.items():
        last_success = await cp.storage.last_job_success(job)
        runs = await cp.storage.job_runs(job, limit)
        failures = 0
        for run in runs:
            if run.outcome != "error":
                break
            failures += 1
        last_error = runs[0].error if runs and runs[0].outcome == "error" else None
        stale_after = config.stale_after_intervals * interval or None
        stale_since: float | None = None
        clock_from = max((t for t in (last_success, watching_since) if t is not None), default=None)
        if stale_after is not None and clock_from is not None and now - clock_from > stale_after:
            stale_since = clock_from + stale_after
        out.append(
            JobStatus(
                job=job,
                interval_seconds=interval,
                last_success=last_success,
                failures=failures,
                last_error=last_error,
                stale_after_seconds=stale_after,
                stale_since=stale_since,
            )
        )
    return out


def _iso(when: float | None) -> str:
    if when is None:
        return "never"
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def alert_text(status: JobStatus) -> str:
    if status.stale:
        since = (
            "has not succeeded since this process started"
            if status.last_success is None
            else f"has not succeeded since {_iso(status.last_success)}"
        )
        why = (
            f"{since} (expected every {status.interval_seconds:g} s; stale since "
            f"{_iso(status.stale_since)})"
        )
    else:
        why = f"failed its last {status.failures} passes"
    error = f"; last error: {status.last_error}" if status.last_error else ""
    return f"Control plane job `{status.job}` {why}{error}"


def is_unhealthy(status: JobStatus, alert_after_failures: int) -> bool:
    failing = alert_after_failures > 0 and status.failures >= alert_after_failures
    return status.stale or failing


async def watch(cp: ControlPlane, *, watching_since: float | None) -> WatchStats:
    """One watcher pass: alert on each stale or failing job, then deliver pending job alerts."""
    config = cp.config.jobs
    stats = WatchStats()
    now = cp.now()
    for status in await statuses(cp, now=now, watching_since=watching_since):
        if not is_unhealthy(status, config.alert_after_failures):
            continue
        stats.unhealthy += 1
        key = alert_key(status.job)
        recent = await cp.storage.parity_alerts(
            key, since=now - config.suppress_seconds, states=ACTIVE_STATES, limit=1
        )
        if recent and config.suppress_seconds > 0:
            stats.suppressed += 1
            log.debug("jobs.alert_suppressed", job=status.job, dedup_key=recent[0].dedup_key)
            continue
        since = status.last_success or watching_since or now
        alert = ParityAlert(
            meter=key,
            bucket_start=now,
            dedup_key=f"{key}:{int(since)}",
            text=alert_text(status),
            state="pending" if cp.config.parity.alert.webhook_url is not None else "logged",
            created_at=now,
        )
        if await cp.storage.record_alert(alert) is None:
            continue  # another process raised it this very second
        stats.alerts += 1
        log.warning("jobs.alert", job=status.job, dedup_key=alert.dedup_key, text=alert.text)
    jobs = scheduled_jobs(cp.config, legacy=cp.legacy is not None, reconcile=cp.reconciles)
    keys = [alert_key(j) for j in jobs]
    # and the alerts the jobs raise on their own
    for key in [*keys, HELD_ALERTS, WEBHOOK_ALERTS, RECONCILE_ALERTS, UNSURE_ALERTS]:
        delivered, failed = await deliver_pending(
            cp.storage, cp.config.parity.alert, key, cp.now, kind="jobs"
        )
        stats.delivered += delivered
        stats.failed += failed
    return stats
