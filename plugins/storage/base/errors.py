"""The provider's asynchronous error reports, shared by the SQL plugins: reported rows held,
customer mappings flagged, the report recorded once."""

from __future__ import annotations

from collections.abc import Sequence

from controlplane import moves
from controlplane.interfaces import AuditEntry, HeldErrors, ProviderError, WebhookRecord
from controlplane.interfaces.storage import ProviderErrorStore
from controlplane.ledger import CUSTOMER_NOT_FOUND, Reason
from controlplane.plugins.storage.base.driver import Connection, SQLDriver


class SQLProviderErrors(SQLDriver, ProviderErrorStore):
    """Error reports: one transaction records the event and applies its samples."""

    async def hold_provider_errors(
        self, record: WebhookRecord, errors: Sequence[ProviderError], at: int, actor: str
    ) -> HeldErrors | None:
        by_identifier: dict[str, ProviderError] = {}
        for error in errors:
            by_identifier.setdefault(error.identifier, error)

        async def work(conn: Connection) -> HeldErrors | None:
            inserted = await conn.fetchval(
                "insert_webhook_event",
                record.event_id,
                record.type,
                record.created,
                at,
                record.outcome,
            )
            if inserted is None:
                return None
            rows = await conn.fetch("provider_error_rows", self._array(sorted(by_identifier)))
            found = {r["identifier"] for r in rows}
            held: list[str] = []
            flagged: list[str] = []
            audit: list[AuditEntry] = []
            why = f"{record.type} {record.event_id}"
            for row in rows:
                if row["reason"] == Reason.PROVIDER_ERROR:
                    continue  # held for a provider error already (another report)
                error = by_identifier[row["identifier"]]
                await conn.execute("hold_provider_error", row["id"], error.code, at)
                held.append(row["identifier"])
                before = {"state": row["state"], "reason": row["reason"]}
                audit.append(
                    moves.provider_error_held(
                        row["identifier"], before, error.code, error.message, actor, why
                    )
                )
                if error.code == CUSTOMER_NOT_FOUND and row["org_id"] not in flagged:
                    await conn.execute("flag_customer", row["org_id"], error.code, at)
                    flagged.append(row["org_id"])
                    audit.append(
                        moves.customer_flagged(
                            row["org_id"], error.code, row["identifier"], actor, why
                        )
                    )
            await self._append_audit(conn, audit, at)
            unmatched = sorted(set(by_identifier) - found)
            return HeldErrors(held=held, unmatched=unmatched, flagged=flagged)

        return await self._tx(f"recording error report {record.event_id}", work)
