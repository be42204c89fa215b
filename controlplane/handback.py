"""Handing back to the legacy biller what the provider may hold, after a rollback
(``cutover rollback --cancel-sent``).

Each row the provider may have (sent, or attempted without a definite answer; never an
offsetting row) takes the way :func:`controlplane.reversal.way_back` decides: handed back
without a call, cancelled at the provider, offset in its open billing period, listed for a
credit note, or kept for reconciliation. A row is handed back (`cancelled`) only once the
provider will not bill it, so the legacy biller, which bills every bucket the control plane
no longer bills, never bills one twice. A bucket goes back whole or not at all: the legacy
biller bills an org's bucket whole or skips it (the seam), so when one of its rows stays at
the provider (a credit note, an unanswered call), every row of it is kept, or the part handed
back would be billed by no one.

An offset is appended first (`pending`, its row still `sent`), attempted, and completed only
when the provider took it: then its row becomes `cancelled`/`offset` in the same transaction.
An offset the provider refused leaves its row `sent` and listed for a credit note; one whose
call failed or went unanswered stays `pending` and is sent again (same identifier, same
timestamp) by the next rollback with ``--cancel-sent``.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from controlplane.config import Config
from controlplane.errors import BillingError, InvalidInput
from controlplane.interfaces import (
    AuditEntry,
    Billing,
    ClosedPeriod,
    CreditNotes,
    InvoicePreviewer,
    MeterEvent,
    Outcome,
    Settlement,
    Storage,
)
from controlplane.ledger import LedgerRow, Reason, RowState
from controlplane.meters import MeterSet
from controlplane.money import price_list
from controlplane.pricing import Price
from controlplane.reversal import (
    CreditNote,
    Decision,
    HandedBack,
    RollbackPreview,
    RowNote,
    Way,
    credit_notes,
    note_of,
    way_back,
)

log = structlog.get_logger("handback")

_TAKEN = (Outcome.ACCEPTED, Outcome.DUPLICATE)


class HandBack:
    """The rows the provider may hold, handed back as :mod:`controlplane.reversal` decides."""

    def __init__(
        self,
        storage: Storage,
        billing: Billing | None,
        meters: MeterSet,
        config: Config,
        now: Callable[[], int],
    ) -> None:
        self.storage, self.billing, self.meters, self.now = storage, billing, meters, now
        self.window = config.cutover.cancel_window_seconds
        self._closed: dict[str, list[ClosedPeriod]] = {}
        self._open: dict[str, tuple[int, int] | None] = {}  # per org, with its customer:
        self._customers: dict[str, str] = {}

    async def run(self, actor: str, *, create_credit_notes: bool = False) -> HandedBack:
        """Hand back every bucket whose rows at the provider can all be handed back; keep
        (and list) every row of the others. The legacy biller bills a bucket whole or not at
        all, so a bucket partly handed back would leave the part handed back billed by no
        one. With `create_credit_notes`, rows on a known finalized invoice are credited there
        first (per invoice and meter) and handed back with it."""
        cancelled: list[RowNote] = []
        offset: list[RowNote] = []
        kept: list[RowNote] = []
        listed: list[tuple[LedgerRow, str | None]] = []
        for pending in await self.storage.unsent_offsets():  # from an earlier rollback
            why = await self._send_offset(pending, actor)
            (kept if why else offset).append(note_of(pending, why or "offset sent again"))
        now = self.now()
        credit = create_credit_notes and isinstance(self.billing, CreditNotes)
        staying, groups = await self._staying(now, credit)
        credited, issued, refused = await self._credit(groups, staying, actor)
        async for row in self._rows_at_provider():
            decision = await self._decide(row, now)
            if decision.way in (Way.CREDIT_NOTE, Way.KEEP):
                kept.append(note_of(row, refused.get(row.id, decision.note)))
                if decision.way is Way.CREDIT_NOTE:
                    listed.append((row, decision.invoice_id))
            elif (row.org_id, row.bucket_start) in staying:
                kept.append(note_of(row, "kept with its bucket: another of its rows stays billed"))
            elif decision.way is Way.OFFSET:
                why = await self._offset(row, actor)
                (kept if why else offset).append(note_of(row, why or "offset"))
                if why:
                    listed.append((row, None))
            else:
                why = await self._cancel(row, decision, actor)
                (kept if why else cancelled).append(note_of(row, why or decision.note))
        log.info(
            "cutover.handed_back",
            cancelled=len(cancelled),
            offset=len(offset),
            credited=len(credited),
            kept=len(kept),
        )
        notes = issued + credit_notes(listed, await self._prices())
        return HandedBack(cancelled, offset, kept, notes, credited)

    async def _credit(
        self,
        groups: dict[tuple[str, str, str], list[LedgerRow]],
        staying: set[tuple[str, int]],
        actor: str,
    ) -> tuple[list[RowNote], list[CreditNote], dict[int, str]]:
        """Credit each (org, invoice, meter) group's units on its invoice and hand its rows
        back; a group the provider refuses stays billed here (its buckets with it): why, per
        row."""
        credited: list[RowNote] = []
        issued: list[CreditNote] = []
        refused: dict[int, str] = {}
        for (org_id, invoice, meter), rows in sorted(groups.items()):
            quantity = sum(r.quantity for r in rows)
            ids = sorted(r.id for r in rows)
            key = "credit:" + hashlib.sha256(f"{invoice}:{meter}:{ids}".encode()).hexdigest()
            assert isinstance(self.billing, CreditNotes)
            try:
                if quantity <= 0:
                    raise BillingError(f"{quantity} units: nothing a credit note can take off")
                noted = await self.billing.credit_usage(
                    invoice,
                    self._event_name(meter),
                    quantity,
                    memo="usage billed by the legacy biller after a rollback",
                    key=key,
                )
            except BillingError as exc:
                # they stay billed here, and so does every row of their buckets: the rows
                # themselves are kept and listed with the others in the pass that follows
                staying.update((r.org_id, r.bucket_start) for r in rows)
                refused.update((r.id, f"credit note on {invoice} not issued: {exc}") for r in rows)
                log.warning("handback.credit_note_refused", invoice=invoice, error=str(exc))
                continue
            detail = f"credit note {noted.credit_note} on invoice {invoice}"
            await self.storage.cancel_rows(ids, self.now(), actor, Reason.CREDITED.value, detail)
            credited += [note_of(r, detail) for r in rows]
            customer = rows[0].attempt_customer
            issued.append(
                CreditNote(
                    org_id, customer, invoice, meter, quantity, len(rows), noted.amount,
                    noted.currency, issued=noted.credit_note,
                )
            )  # fmt: skip
        return credited, issued, refused

    async def preview(self, limit: int = 100) -> RollbackPreview:
        """What :meth:`run` would do now, changing nothing (the newest `limit` rows of each
        way, and their counts)."""
        ways: dict[Way, deque[LedgerRow]] = {
            w: deque(maxlen=limit) for w in (Way.CANCEL, Way.OFFSET, Way.CREDIT_NOTE)
        }
        counts = dict.fromkeys(ways, 0)
        now = self.now()
        staying, _ = await self._staying(now)
        async for row in self._rows_at_provider():
            decided = (await self._decide(row, now)).way
            if (row.org_id, row.bucket_start) in staying:
                decided = Way.KEEP  # kept with its bucket
            way = {Way.HAND_BACK: Way.CANCEL, Way.KEEP: Way.CREDIT_NOTE}.get(decided, decided)
            ways[way].append(row)
            counts[way] += 1

        def newest(way: Way) -> list[LedgerRow]:
            return sorted(ways[way], key=lambda r: -r.id)

        return RollbackPreview(
            newest(Way.CANCEL),
            counts[Way.CANCEL],
            newest(Way.OFFSET),
            counts[Way.OFFSET],
            newest(Way.CREDIT_NOTE),
            counts[Way.CREDIT_NOTE],
        )

    # -- the decision's inputs ----------------------------------------------------------------

    async def _staying(
        self, now: int, credit: bool = False
    ) -> tuple[set[tuple[str, int]], dict[tuple[str, str, str], list[LedgerRow]]]:
        """The (org, bucket) pairs with a row that stays at the provider, billed here still,
        so every row of theirs is kept; and, when `credit`, the rows a credit note on their
        known invoice can hand back instead, per (org, invoice, meter)."""
        staying: set[tuple[str, int]] = set()
        groups: dict[tuple[str, str, str], list[LedgerRow]] = {}
        async for row in self._rows_at_provider():
            decision = await self._decide(row, now)
            if decision.way is Way.CREDIT_NOTE and credit and decision.invoice_id:
                groups.setdefault((row.org_id, decision.invoice_id, row.meter), []).append(row)
            elif decision.way in (Way.CREDIT_NOTE, Way.KEEP):
                staying.add((row.org_id, row.bucket_start))
        # a group with a row in a bucket that stays is not credited (its bucket stays billed
        # here, whole); that keeps its other buckets too, which may keep other groups
        while dropped := [
            key
            for key, rows in groups.items()
            if any((r.org_id, r.bucket_start) in staying for r in rows)
        ]:
            for key in dropped:
                staying.update((r.org_id, r.bucket_start) for r in groups.pop(key))
        return staying, groups

    async def _decide(self, row: LedgerRow, now: int) -> Decision:
        if row.org_id not in self._closed:
            self._closed[row.org_id] = await self.storage.closed_periods([row.org_id])
        return way_back(
            row,
            now=now,
            cancel_window=self.window,
            open_period=await self._open_period(row),
            closed=self._closed[row.org_id],
        )

    async def _open_period(self, row: LedgerRow) -> tuple[int, int] | None:
        """The org's current billing period as the provider's invoice preview says it, for a
        row sent to the org's customer now; None when it cannot be known."""
        if row.org_id not in self._open:
            self._open[row.org_id] = None
            org = await self.storage.get_org(row.org_id)
            billing = self.billing
            if org and org.customer and org.subscription and isinstance(billing, InvoicePreviewer):
                try:
                    preview = await billing.preview_invoice(org.customer, org.subscription)
                except BillingError as exc:
                    log.warning("handback.no_open_period", org_id=row.org_id, error=str(exc))
                else:
                    self._open[row.org_id] = (preview.period_start, preview.period_end)
                    self._customers[row.org_id] = org.customer
        if row.attempt_customer != self._customers.get(row.org_id):
            return None  # sent to a customer the org no longer has: not its open period
        return self._open[row.org_id]

    async def _prices(self) -> dict[str, Price]:
        version = await self.storage.catalog_version()
        if version is None:
            return {}
        try:
            prices = price_list(version.catalog.get("prices", {})).prices
        except InvalidInput:
            return {}
        return {p.meter: p for p in prices if p.meter is not None}

    async def _rows_at_provider(self) -> AsyncIterator[LedgerRow]:
        """Every row the provider may have: sent, or attempted without a definite answer (still
        pending, or held as `ambiguous`; not rows the provider refused); never an offset."""
        for state, attempted in (
            (RowState.SENT, None),
            (RowState.PENDING, True),
            (RowState.HELD, True),
        ):
            after = 0
            while rows := await self.storage.ledger(
                state=state, attempted=attempted, after_id=after, limit=5000
            ):
                for row in rows:
                    if row.offsets_id is not None:
                        continue  # an offset: taking it back would bill its row again
                    if row.state is RowState.HELD and row.reason != Reason.AMBIGUOUS:
                        continue  # the provider answered no (or the row waits for a customer)
                    yield row
                after = rows[-1].id

    # -- acting on it ---------------------------------------------------------------------------

    def _event_name(self, meter: str) -> str:
        found = self.meters.by_name.get(meter)
        return found.config.provider_event_name if found else meter

    async def _cancel(self, row: LedgerRow, decision: Decision, actor: str) -> str | None:
        """Cancel `row` (at the provider unless never delivered); None when done, else why
        not."""
        detail = decision.note or "cancelled at the provider"
        if decision.way is Way.CANCEL:
            if self.billing is None:
                return "no billing backend configured"
            delivery = await self.billing.cancel(self._event_name(row.meter), row.identifier)
            if delivery.outcome not in _TAKEN:
                unknown = (
                    "attempted without a definite answer (it may never have arrived); "
                    if row.state is not RowState.SENT
                    else ""
                )
                why = f"provider {delivery.outcome.value}: {delivery.message or 'no detail'}"
                return unknown + why
        moved = await self.storage.cancel_rows(
            [row.id], self.now(), actor, Reason.ROLLED_BACK.value, detail
        )
        return None if moved else "moved meanwhile"

    async def _offset(self, row: LedgerRow, actor: str) -> str | None:
        """Offset `row`; None when the provider took the offset, else why not."""
        if self.billing is None:
            return "no billing backend configured"
        new = await self.storage.offset_rows(
            [row.id], self.now(), actor, "rolled back past the cancel window"
        )
        if not new:
            return "moved meanwhile"
        return await self._send_offset(new[0], actor)

    async def _send_offset(self, offset: LedgerRow, actor: str) -> str | None:
        """Send an offsetting row as its row was called; None when the provider took it (and
        its row is handed back), else why not."""
        assert self.billing is not None
        customer, stamp = offset.attempt_customer, offset.attempt_timestamp
        if customer is None or stamp is None:
            return "the row it offsets was never called with a customer and timestamp"
        event = MeterEvent(
            identifier=offset.identifier,
            event_name=self._event_name(offset.meter),
            customer=customer,
            value=offset.quantity,
            timestamp=stamp,
            idempotency_key=offset.attempt_key or offset.identifier,
        )
        await self.storage.record_attempts([offset.id], self.now())
        delivery = await self.billing.send(event)
        message = delivery.message or "no detail"
        if delivery.outcome in _TAKEN:
            taken = Settlement(
                offset.id,
                offset.identifier,
                RowState.SENT,
                provider_id=delivery.provider_id,
                customer=customer,
                quantity=offset.quantity,
            )
            if not await self.storage.complete_offsets([taken], self.now(), actor):
                return (
                    f"offset {offset.identifier} taken by the provider, but the row it offsets "
                    "is no longer sent here (moved meanwhile): for a person to settle"
                )
            return None
        if delivery.outcome is Outcome.REJECTED:
            audit: dict[str, Any] = {"state": "held", "reason": "provider_rejected"}
            refused = Settlement(
                offset.id,
                offset.identifier,
                RowState.HELD,
                reason=Reason.PROVIDER_REJECTED.value,
                detail=message,
                audit=AuditEntry(
                    action="ledger.held",
                    subject=offset.identifier,
                    actor=actor,
                    reason=message,
                    before={"state": "pending"},
                    after=audit,
                ),
            )
            await self.storage.settle([refused], self.now())
            return f"the provider refused its offset ({message}): it stays sent"
        return (
            f"offset {offset.identifier} not answered ({delivery.outcome.value}: {message}): "
            "it stays sent; run the rollback with --cancel-sent again to send the offset again"
        )
