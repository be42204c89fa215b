"""Parity, catalog and webhooks: their storage methods, shared by the SQL plugins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from controlplane.interfaces import (
    AuditEntry,
    CatalogVersion,
    ClosedPeriod,
    OrgChange,
    OrgDrift,
    ParityAlert,
    ParityRun,
    WebhookRecord,
)
from controlplane.interfaces.storage import CatalogStore, ParityStore, WebhookStore
from controlplane.plugins.storage._common import from_row, parity_run
from controlplane.plugins.storage.base.driver import AUDIT_LOCK, Connection, SQLDriver

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


class SQLParity(SQLDriver, ParityStore):
    """Parity runs, mismatches and alerts."""

    async def record_parity_run(
        self, run: ParityRun, drifts: Sequence[OrgDrift], alert: ParityAlert | None
    ) -> int | None:
        async def work(conn: Connection) -> int | None:
            run_id: int | None = await conn.fetchval(
                "insert_parity_run",
                run.meter,
                run.bucket_start,
                run.bucket_end,
                run.checked_at,
                run.orgs,
                run.mismatches,
                run.material,
                run.controlplane_micros,
                run.legacy_micros,
                run.worst_org,
                run.worst_drift_micros,
                run.worst_relative,
                run.clean,
                run.alarming,
                run.alarm_since,
            )
            if run_id is None:
                return None  # that bucket was checked already
            await conn.executemany(
                "insert_parity_mismatch",
                [(run_id, d.org_id, d.controlplane_micros, d.legacy_micros) for d in drifts],
            )
            if alert is not None:
                await _insert_alert(conn, alert)
            return run_id

        return await self._tx("recording a parity run", work)

    async def parity_runs(
        self, meter: str, *, limit: int = 100, start: int | None = None, end: int | None = None
    ) -> list[ParityRun]:
        return [parity_run(r) for r in await self._all("parity_runs", meter, start, end, limit)]

    async def parity_run(self, run_id: int) -> tuple[ParityRun, list[OrgDrift]] | None:
        rows = await self._all("parity_run", run_id)
        if not rows:
            return None
        drifts = await self._all("parity_run_mismatches", run_id)
        return parity_run(rows[0]), [from_row(OrgDrift, d) for d in drifts]

    async def parity_clean_tail(self, meter: str) -> list[int]:
        return [r["bucket_start"] for r in await self._all("parity_clean_tail", meter)]

    async def parity_alerts(
        self,
        meter: str,
        *,
        since: int | None = None,
        states: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[ParityAlert]:
        rows = await self._all(
            "parity_alerts",
            meter,
            since,
            None if states is None else self._array(list(states)),
            limit,
        )
        return [from_row(ParityAlert, r) for r in rows]

    async def record_alert(self, alert: ParityAlert) -> int | None:
        return await self._tx("recording an alert", lambda conn: _insert_alert(conn, alert))

    async def update_parity_alert(
        self, alert_id: int, *, state: str, attempts: int, sent_at: int | None, error: str | None
    ) -> None:
        await self._tx(
            "update parity alert",
            lambda conn: conn.execute(
                "update_parity_alert", state, attempts, sent_at, error, alert_id
            ),
        )


class SQLCatalogWebhooks(SQLDriver, CatalogStore, WebhookStore):
    """Catalog versions, processed webhook events and closed periods."""

    async def catalog_version(self, version: int | None = None) -> CatalogVersion | None:
        if version is None:
            rows = await self._all("latest_catalog")
        else:
            rows = await self._all("catalog_version", version)
        if not rows:
            return None
        return from_row(CatalogVersion, rows[0], catalog=_decode.decode(rows[0]["catalog"]))

    async def publish_catalog(
        self, catalog: dict[str, Any], digest: str, actor: str, at: int, audit: AuditEntry
    ) -> CatalogVersion:
        async def work(conn: Connection) -> int:
            version = int(
                await conn.fetchval(
                    "insert_catalog", at, actor, digest, _json.encode(catalog).decode()
                )
            )
            after = dict(audit.after) if isinstance(audit.after, dict) else {}
            await self._append_audit(
                conn, [msgspec.structs.replace(audit, after={**after, "version": version})], at
            )
            return version

        # the audit lock first: publishers queue up, and each numbers after the last
        version = await self._tx("publishing the catalog", work, AUDIT_LOCK)
        return CatalogVersion(
            version=version, published_at=at, actor=actor, digest=digest, catalog=catalog
        )

    async def webhook_outcome(self, event_id: str) -> str | None:
        rows = await self._all("webhook_event", event_id)
        return str(rows[0]["outcome"]) if rows else None

    async def record_webhook(
        self,
        record: WebhookRecord,
        at: int,
        *,
        org: OrgChange | None = None,
        closed: ClosedPeriod | None = None,
        audit: Sequence[AuditEntry] = (),
    ) -> bool:
        async def work(conn: Connection) -> bool:
            inserted = await conn.fetchval(
                "insert_webhook_event",
                record.event_id,
                record.type,
                record.created,
                at,
                record.outcome,
            )
            if inserted is None:
                return False
            if org is not None:
                await conn.execute("upsert_org", org.org_id, org.customer, at)
                row = await conn.fetchrow("org_subscription", org.org_id)
                subscription = row["subscription"] if row else None
                status = row["subscription_status"] if row else None
                await conn.execute(
                    "set_org_subscription",
                    org.subscription or subscription,
                    org.subscription_status or status,
                    at,
                    org.org_id,
                )
                if org.plan is not None:
                    await conn.execute("upsert_plan", org.org_id, org.effective_from, org.plan)
                for period in org.plans:
                    await conn.execute(
                        "upsert_plan", org.org_id, period.effective_from, period.plan
                    )
                if org.plan is not None or org.plans:
                    await conn.execute("release_org_buckets", org.org_id)
            if closed is not None:
                await conn.execute(
                    "insert_closed_period",
                    closed.invoice_id,
                    closed.org_id,
                    closed.period_start,
                    closed.period_end,
                    closed.finalized_at,
                )
            await self._append_audit(conn, audit, at)
            return True

        return await self._tx(f"recording webhook {record.event_id}", work)

    async def org_for_billing(
        self, *, subscription: str | None, customer: str | None
    ) -> str | None:
        if subscription:
            rows = await self._all("org_by_subscription", subscription)
            if rows:
                return str(rows[0]["org_id"])
        if customer:
            rows = await self._all("org_by_customer", customer)
            if rows:
                return str(rows[0]["org_id"])
        return None

    async def closed_periods(self, org_ids: Sequence[str]) -> list[ClosedPeriod]:
        rows = await self._all("closed_periods", self._array(list(org_ids)))
        return [from_row(ClosedPeriod, r) for r in rows]


async def _insert_alert(conn: Connection, alert: ParityAlert) -> int | None:
    """The alert's id, or None when one for its (meter, bucket) exists already."""
    a = alert
    alert_id: int | None = await conn.fetchval(
        "insert_alert", a.meter, a.bucket_start, a.dedup_key, a.text, a.state, a.created_at
    )
    return alert_id
