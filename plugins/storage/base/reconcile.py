"""Reconciliation runs: their storage methods, shared by the SQL plugins."""

from __future__ import annotations

import msgspec

from controlplane.interfaces import Finding, ReconcileRun
from controlplane.interfaces.storage import ReconcileStore
from controlplane.plugins.storage.base.driver import SQLDriver

_findings = msgspec.json.Decoder(list[Finding])


class SQLReconcile(SQLDriver, ReconcileStore):
    """Reconciliation runs, their findings kept as one JSON array."""

    async def record_reconcile_run(self, run: ReconcileRun) -> int:
        findings = msgspec.json.encode(run.findings).decode()
        return int(
            await self._tx(
                "recording a reconciliation",
                lambda conn: conn.fetchval(
                    "insert_reconcile_run",
                    run.checked_at,
                    run.start,
                    run.end,
                    run.org_id,
                    run.customers,
                    run.hours,
                    run.units_short,
                    run.units_over,
                    run.clean,
                    findings,
                ),
            )
        )

    async def reconcile_runs(self, *, limit: int = 50) -> list[ReconcileRun]:
        return [
            ReconcileRun(
                checked_at=r["checked_at"],
                start=r["start"],
                end=r["end"],
                org_id=r["org_id"],
                customers=r["customers"],
                hours=r["hours"],
                units_short=r["units_short"],
                units_over=r["units_over"],
                clean=bool(r["clean"]),
                findings=_findings.decode(r["findings"]),
                id=r["id"],
            )
            for r in await self._all("reconcile_runs", limit)
        ]
