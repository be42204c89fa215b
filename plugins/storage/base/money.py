"""Money parity: its storage methods, shared by the SQL plugins."""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.interfaces import MeterQuantity, MoneyOrgResult, MoneyRun
from controlplane.interfaces.storage import MoneyParityStore
from controlplane.plugins.storage._common import from_row
from controlplane.plugins.storage.base.driver import Connection, SQLDriver


class SQLMoneyParity(SQLDriver, MoneyParityStore):
    """The ledger's billable quantities per period, and money parity runs."""

    async def ledger_quantities(self, start: int, end: int) -> list[MeterQuantity]:
        rows = await self._all("ledger_quantities", start, end)
        return [from_row(MeterQuantity, r) for r in rows]

    async def record_money_run(self, run: MoneyRun, orgs: Sequence[MoneyOrgResult]) -> int:
        async def work(conn: Connection) -> int:
            run_id: int = await conn.fetchval(
                "insert_money_run",
                run.period_start,
                run.period_end,
                run.checked_at,
                run.currency,
                run.tolerance,
                run.orgs,
                run.mismatches,
                run.only_controlplane,
                run.only_legacy,
                run.stripe_findings,
                run.controlplane_minor,
                run.legacy_minor,
                run.clean,
            )
            await conn.executemany(
                "insert_money_org",
                [
                    (
                        run_id,
                        o.org_id,
                        o.controlplane_minor,
                        o.legacy_minor,
                        o.stripe_minor,
                        o.within_tolerance,
                    )
                    for o in orgs
                ],
            )
            return run_id

        return await self._tx("recording a money parity run", work)

    async def money_runs(self, *, limit: int = 100) -> list[MoneyRun]:
        return [from_row(MoneyRun, r) for r in await self._all("money_runs", limit)]

    async def money_run(self, run_id: int) -> tuple[MoneyRun, list[MoneyOrgResult]] | None:
        rows = await self._all("money_run", run_id)
        if not rows:
            return None
        orgs = await self._all("money_run_orgs", run_id)
        return from_row(MoneyRun, rows[0]), [from_row(MoneyOrgResult, o) for o in orgs]
