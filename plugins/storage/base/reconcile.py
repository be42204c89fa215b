"""Reconciliation: the runs, the units sent per hour of the timestamp sent, and the rows
moved by what the provider's books show; shared by the SQL plugins."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from controlplane.interfaces import Finding, ReconcileRun, RowMove, SentCell
from controlplane.interfaces.storage import ReconcileStore
from controlplane.ledger import LedgerRow
from controlplane.plugins.storage._common import from_row, ledger_row
from controlplane.plugins.storage.base.driver import Connection, SQLDriver

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

    async def sent_cells(self, start: int, end: int, org_id: str | None) -> list[SentCell]:
        return [from_row(SentCell, r) for r in await self._all("sent_cells", start, end, org_id)]

    async def stamped_rows(
        self, org_id: str, meter: str, customer: str, start: int, end: int
    ) -> list[LedgerRow]:
        rows = await self._all("stamped_rows", org_id, meter, customer, start, end)
        return [ledger_row(r) for r in rows]

    async def move_rows(self, moves: Sequence[RowMove], at: int) -> list[int]:
        async def work(conn: Connection) -> list[int]:
            moved = []
            for m in moves:
                args = (m.row_id, m.state, m.reason, m.detail, at)
                if await conn.fetch("move_row", *args, m.expect_state, m.expect_reason):
                    moved.append(m)
            await self._append_audit(conn, [m.audit for m in moved], at)
            return [m.row_id for m in moved]

        return await self._tx("moving rows by the provider's books", work)
