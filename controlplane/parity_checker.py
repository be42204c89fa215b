"""The scheduled parity checker: each settled bucket compared once, stored, and alerted on.

A bucket is *settled* when it is closed (its end is at or before ``now - rollup.grace_seconds``)
and ended at least ``parity.settle_seconds`` ago, giving the legacy biller time to catch up.
Each pass checks the settled buckets after the newest one already checked, oldest first (on its
first pass it starts ``parity.backfill_buckets`` back), at most :data:`MAX_BUCKETS_PER_PASS`.
A failure of the legacy source ends the pass without recording the bucket, so the next pass
checks it again: a bucket is only ever recorded with an answer from both sides.

Each checked bucket is stored with its mismatching orgs (one transaction, unique per bucket).
When it ends a streak of ``parity.alert.consecutive_buckets`` alarming buckets (see
:mod:`controlplane.parity`), an alert is raised: logged as ``parity.alert`` and POSTed to
``parity.alert.webhook_url`` as ``{"text", "dedup_key"}``, unless an alert of the same meter was
raised within ``parity.alert.suppress_seconds`` (then it is stored as ``suppressed``). Delivery
is retried on later passes until the suppression window (at least an hour) has passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import httpx
import msgspec
import structlog

from controlplane import parity
from controlplane.config import ParityAlertConfig, ParityConfig
from controlplane.interfaces import LegacyError, ParityAlert, ParityRun, Storage
from controlplane.secrets import reveal

log = structlog.get_logger("parity")

MAX_BUCKETS_PER_PASS = 48
ACTIVE_STATES = ("pending", "sent", "logged")  # alerts that suppress newer ones


class CheckerStats(msgspec.Struct):
    checked: int = 0
    clean: int = 0
    mismatched: int = 0
    alarming: int = 0
    alerts: int = 0
    suppressed: int = 0
    delivered: int = 0
    failed: int = 0
    skipped: str | None = None


def settled_end(now: int, grace_seconds: int, settle_seconds: int, bucket_seconds: int) -> int:
    """Buckets ending at or before this boundary are settled."""
    horizon = now - max(grace_seconds, settle_seconds)
    return horizon - horizon % bucket_seconds


@dataclasses.dataclass(frozen=True)
class ParityChecker:
    """What a checker pass needs: the stored runs and alerts, `[parity]`, the bucket timing,
    the comparison of one window (:meth:`ControlPlane.parity`) and a clock."""

    storage: Storage
    config: ParityConfig
    bucket_seconds: int
    grace_seconds: int
    compare: Callable[[int, int], Awaitable[parity.Comparison]]
    clock: Callable[[], int]
    has_legacy: bool

    async def run(self) -> CheckerStats:
        """One checker pass."""
        stats = CheckerStats()
        if not self.has_legacy:
            stats.skipped = "no legacy source configured ([legacy])"
            return stats
        config = self.config
        bucket = self.bucket_seconds
        policy = policy_of(config.alert)
        end = settled_end(self.clock(), self.grace_seconds, config.settle_seconds, bucket)
        newest = await self.storage.parity_runs(config.meter, limit=1)
        previous: ParityRun | None = newest[0] if newest else None
        start = previous.bucket_end if previous else end - config.backfill_buckets * bucket
        try:
            await self._check(stats, start, end, previous, policy)
        except LegacyError:
            # The bucket is not recorded, so the next pass checks it again; alerts raised
            # before the failure are still delivered.
            await self._deliver_into(stats)
            raise
        await self._deliver_into(stats)
        return stats

    async def _deliver_into(self, stats: CheckerStats) -> None:
        delivered, failed = await deliver_pending(
            self.storage, self.config.alert, self.config.meter, self.clock
        )
        stats.delivered, stats.failed = delivered, failed

    async def _check(
        self,
        stats: CheckerStats,
        start: int,
        end: int,
        previous: ParityRun | None,
        policy: parity.Policy,
    ) -> None:
        config = self.config
        bucket = self.bucket_seconds
        meter = config.meter
        while start + bucket <= end and stats.checked < MAX_BUCKETS_PER_PASS:
            comparison = await self.compare(start, start + bucket)
            now = self.clock()
            record = parity.to_run(comparison, now, previous)
            alert = await self._alert_for(comparison, record, policy, now)
            run_id = await self.storage.record_parity_run(record, parity.drifts(comparison), alert)
            if run_id is None:  # checked meanwhile by another process: continue from its record
                newest = await self.storage.parity_runs(meter, limit=1, start=start, end=start + 1)
                previous = newest[0] if newest else None
                start += bucket
                continue
            record = msgspec.structs.replace(record, id=run_id)
            stats.checked += 1
            stats.clean += record.clean
            stats.mismatched += not record.clean
            stats.alarming += record.alarming
            log.info(
                "parity.checked",
                meter=meter,
                bucket_start=start,
                status="clean" if record.clean else "mismatch",
                orgs=record.orgs,
                mismatches=record.mismatches,
                alarming=record.alarming,
            )
            if alert is not None:
                stats.alerts += 1
                if alert.state == "suppressed":
                    stats.suppressed += 1
                    log.info(
                        "parity.alert_suppressed",
                        meter=meter,
                        bucket_start=start,
                        dedup_key=alert.dedup_key,
                        suppress_seconds=config.alert.suppress_seconds,
                    )
                else:
                    log.warning(
                        "parity.alert",
                        meter=meter,
                        bucket_start=start,
                        dedup_key=alert.dedup_key,
                        text=alert.text,
                    )
            previous = record
            start += bucket

    async def _alert_for(
        self,
        comparison: parity.Comparison,
        record: ParityRun,
        policy: parity.Policy,
        now: int,
    ) -> ParityAlert | None:
        bucket = self.bucket_seconds
        if not parity.should_alert(record, bucket, policy.consecutive):
            return None
        config = self.config.alert
        recent = await self.storage.parity_alerts(
            record.meter, since=now - config.suppress_seconds, states=ACTIVE_STATES, limit=1
        )
        if recent and config.suppress_seconds > 0:
            state = "suppressed"
        else:
            state = "pending" if config.webhook_url is not None else "logged"
        return ParityAlert(
            meter=record.meter,
            bucket_start=record.bucket_start,
            dedup_key=parity.dedup_key(record),
            text=parity.alert_text(comparison, record, policy, bucket),
            state=state,
            created_at=now,
        )


def policy_of(alert: ParityAlertConfig) -> parity.Policy:
    """The alarm policy `[parity.alert]` sets."""
    return parity.Policy.of(
        alert.relative, alert.min_units, alert.min_orgs, alert.consecutive_buckets
    )


async def deliver_pending(
    storage: Storage,
    config: ParityAlertConfig,
    key: str,
    clock: Callable[[], int],
    *,
    kind: str = "parity",
) -> tuple[int, int]:
    """POST every pending alert of `key` (a meter, or a job's ``job:<name>``) to the webhook
    of `[parity.alert]`; returns (delivered, given up). `kind` prefixes the log events
    (``parity.alert_sent``, ...)."""
    pending = await storage.parity_alerts(key, states=["pending"], limit=50)
    if not pending:
        return 0, 0
    delivered = failed = 0
    give_up_after = max(config.suppress_seconds, 3600)
    url = reveal(config.webhook_url, "parity.alert.webhook_url") if config.webhook_url else None
    async with httpx.AsyncClient(timeout=config.timeout_seconds) as client:
        for alert in reversed(pending):  # oldest first
            now = clock()
            if url is None:
                await storage.update_parity_alert(
                    alert.id, state="logged", attempts=alert.attempts, sent_at=None, error=None
                )
                continue
            error: str | None = None
            try:
                response = await client.post(
                    url, json={"text": alert.text, "dedup_key": alert.dedup_key}
                )
                if not 200 <= response.status_code < 300:
                    error = f"webhook answered {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"webhook unreachable: {type(exc).__name__}"  # never the (secret) URL
            attempts = alert.attempts + 1
            if error is None:
                delivered += 1
                await storage.update_parity_alert(
                    alert.id, state="sent", attempts=attempts, sent_at=now, error=None
                )
                log.info(f"{kind}.alert_sent", dedup_key=alert.dedup_key, attempts=attempts)
                continue
            final = now - alert.created_at >= give_up_after
            if final:
                failed += 1
            await storage.update_parity_alert(
                alert.id,
                state="failed" if final else "pending",
                attempts=attempts,
                sent_at=None,
                error=error,
            )
            log.error(
                f"{kind}.alert_failed",
                dedup_key=alert.dedup_key,
                attempts=attempts,
                error=error,
                final=final,
            )
    return delivered, failed
