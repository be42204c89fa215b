"""Handing back to the legacy biller what the provider may hold, after a rollback
(``cutover rollback --cancel-sent``).

Each row the provider may have (sent, or attempted without a definite answer; never an
offsetting row) takes the way :func:`controlplane.reversal.way_back` decides: handed back
without a call, cancelled at the provider, offset in its open billing period, credited on its
finalized invoice, listed for a credit note, or kept for reconciliation. A row is handed back
(`cancelled`) only once the provider will not bill it, so the legacy biller, which bills every
bucket the control plane no longer bills, never bills one twice.

A bucket goes back whole or not at all: the legacy biller bills an org's bucket whole or skips
it (the seam), so a bucket partly handed back would leave the part handed back billed by no
one. So the hand-back acts per bucket (every meter's rows, every revision):

- a bucket with a row that stays at the provider (a credit note to list, an unanswered call
  past the cancel window, an offset the provider refused before) keeps every row;
- a credit note is one per invoice, with a line per meter (one call: issued whole or not at
  all), and only for buckets whose rows at the provider all sit on that one invoice;
- otherwise the provider's calls come first (offsets left unanswered by an earlier rollback,
  then cancels, then offsets), then the rows that need no call. When the provider refuses one
  call, what the bucket's earlier calls took back is billed again, so the bucket stays billed
  here, whole: a cancelled row is re-issued under its bucket's next revision and sent at
  once, an offset is undone by an offset of its own (:meth:`HandBack._restore`). When a call
  goes unanswered, what was done stays done and the bucket is finished by the next rollback
  with ``--cancel-sent`` (the unanswered offset is sent again under the same identifier,
  unless its invoice was finalized since: then the bucket stays, for reconciliation). A
  restore that fails, or a bucket left part handed back, raises a ``job:rollback:split``
  alert naming the bucket. The rollback holds every bucket billed here meanwhile, so no
  sender sends a correction of one (``Cutover.rollback``).

An offset is appended first (`pending`, its row still `sent`), attempted, and completed only
when the provider took it: then its row becomes `cancelled`/`offset` in the same transaction.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable

import msgspec
import structlog

from controlplane import moves
from controlplane.config import Config
from controlplane.errors import BillingError, BillingUnanswered, InvalidInput
from controlplane.interfaces import (
    Attempt,
    AuditEntry,
    Billing,
    ClosedPeriod,
    CreditNotes,
    InvoicePreviewer,
    MeterEvent,
    Outcome,
    ParityAlert,
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
SPLIT_ALERTS = "job:rollback:split"  # delivered by the job watcher

Bucket = tuple[str, int]  # (org, bucket start): the legacy biller bills it whole, or skips it
Group = tuple[str, str]  # (org, finalized invoice): one credit note


class _Found(msgspec.Struct):
    """Every row the provider may hold, with the way back decided for each."""

    decided: list[tuple[LedgerRow, Decision]]
    unsent_offsets: list[LedgerRow]  # offsets whose call failed or went unanswered
    offset_pending: set[int] = set()  # the rows they offset
    offsets: set[int] = set()  # offsetting rows the provider took
    refused: set[int] = set()  # rows whose offset the provider refused
    handed: set[Bucket] = set()  # buckets a rollback handed back rows of, by a call


class _Report(msgspec.Struct):
    cancelled: list[RowNote] = []
    offset: list[RowNote] = []
    kept: list[RowNote] = []
    credited: list[RowNote] = []
    issued: list[CreditNote] = []
    listed: list[tuple[LedgerRow, str | None]] = []  # for a credit note, with its invoice
    handed: set[int] = set()  # rows credited
    refused: dict[int, str] = {}  # rows whose credit note was not issued: why
    unanswered: set[int] = set()  # rows whose credit note may have been issued


class _Failed(msgspec.Struct, frozen=True):
    why: str
    definite: bool  # the provider answered no (else: no answer, it may have been applied)


class HandBack:
    """The rows the provider may hold, handed back bucket by bucket as
    :mod:`controlplane.reversal` decides."""

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
        self._run = uuid.uuid4().hex[:8]  # a split found by a later run is alerted again

    async def run(self, actor: str, *, create_credit_notes: bool = False) -> HandedBack:
        """Hand back every bucket whose rows at the provider can all be handed back; keep
        (and list) every row of the others. With `create_credit_notes`, rows on a known
        finalized invoice are credited there (one credit note per invoice) and handed back
        with it."""
        found = await self._find(self.now())
        credit = create_credit_notes and isinstance(self.billing, CreditNotes)
        waiting: dict[Bucket, str] = {}  # buckets an unanswered offset keeps here
        for offset in found.unsent_offsets:
            bucket = (offset.org_id, offset.bucket_start)
            if offset.offsets_id in found.offsets:
                waiting[bucket] = f"{offset.identifier} (undoing an offset) waits for an answer"
            elif await self._finalized(offset):
                waiting[bucket] = (
                    f"offset {offset.identifier} was attempted without an answer before its "
                    "invoice was finalized: whether the invoice carries its row is not known "
                    "here; reconciliation (the hour's summary) settles it"
                )
        staying, groups = _staying(found, credit, waiting)
        out = _Report()
        for group, rows in sorted(groups.items()):
            await self._credit(group, rows, staying, actor, out)
        buckets: dict[Bucket, list[tuple[LedgerRow, Decision]]] = defaultdict(list)
        for row, decision in found.decided:
            bucket = (row.org_id, row.bucket_start)
            if row.id in out.handed:
                continue  # credited
            if decision.way in (Way.CREDIT_NOTE, Way.KEEP):
                out.kept.append(note_of(row, out.refused.get(row.id, decision.note)))
                if decision.way is Way.CREDIT_NOTE and row.id not in out.unanswered:
                    out.listed.append((row, decision.invoice_id))
            elif bucket in staying:
                out.kept.append(note_of(row, f"kept with its bucket: {staying[bucket]}"))
                if row.id in found.refused:
                    out.listed.append((row, None))
            elif row.id not in found.offset_pending:  # else its offset is the step
                buckets[bucket].append((row, decision))
        for offset in found.unsent_offsets:
            bucket = (offset.org_id, offset.bucket_start)
            if await self._finalized(offset):
                # called before the invoice was finalized, unanswered: on it or not, unknown
                out.kept.append(note_of(offset, f"not sent again: {staying[bucket]}"))
                continue
            buckets[bucket].append((offset, Decision(Way.OFFSET)))
        for bucket in found.handed.intersection(staying):
            buckets.setdefault(bucket, [])  # handed back in part by an earlier rollback
        for bucket, steps in sorted(buckets.items()):
            await self._hand_back(bucket, steps, staying.get(bucket), actor, out)
        log.info(
            "cutover.handed_back",
            cancelled=len(out.cancelled),
            offset=len(out.offset),
            credited=len(out.credited),
            kept=len(out.kept),
        )
        notes = out.issued + credit_notes(out.listed, await self._prices())
        return HandedBack(out.cancelled, out.offset, out.kept, notes, out.credited)

    async def preview(self, limit: int = 100) -> RollbackPreview:
        """What :meth:`run` would do now, changing nothing (the newest `limit` rows of each
        way, and their counts)."""
        ways: dict[Way, deque[LedgerRow]] = {
            w: deque(maxlen=limit) for w in (Way.CANCEL, Way.OFFSET, Way.CREDIT_NOTE)
        }
        counts = dict.fromkeys(ways, 0)
        found = await self._find(self.now())
        staying, _ = _staying(found, credit=False)
        for row, decision in found.decided:
            decided = decision.way
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

    # -- one bucket -----------------------------------------------------------------------------

    async def _hand_back(
        self,
        bucket: Bucket,
        steps: list[tuple[LedgerRow, Decision]],
        stays: str | None,
        actor: str,
        out: _Report,
    ) -> None:
        """Hand one bucket back whole: offsets an earlier rollback left unanswered, then the
        provider's calls (cancels before offsets), then the rows that need none. When the
        provider refuses one (or the bucket `stays`), what was taken back is billed again."""
        rank = {Way.CANCEL: 0, Way.OFFSET: 1, Way.HAND_BACK: 2}
        steps.sort(key=lambda s: (s[0].offsets_id is None, rank[s[1].way], s[0].id))
        cancelled: list[RowNote] = []
        offset: list[RowNote] = []
        refused = _Failed(stays, definite=True) if stays else None
        unanswered: _Failed | None = None
        for row, decision in steps:
            resend = row.offsets_id is not None  # settled whatever else happens
            stop = refused or unanswered
            if stop is not None and not resend:
                out.kept.append(note_of(row, f"kept with its bucket: {stop.why}"))
                continue
            failure = await self._step(row, decision, actor)
            if failure is None:
                if resend:
                    offset.append(note_of(row, "offset sent again"))
                elif decision.way is Way.OFFSET:
                    offset.append(note_of(row, "offset"))
                else:
                    cancelled.append(note_of(row, decision.note))
                continue
            out.kept.append(note_of(row, failure.why))
            if failure.definite:
                refused = refused or failure
                if decision.way is Way.OFFSET and not resend:
                    out.listed.append((row, None))
            else:
                unanswered = unanswered or failure
        if refused is not None:
            out.kept += await self._restore(bucket, refused.why, actor)
            return
        out.cancelled += cancelled
        out.offset += offset
        if unanswered is not None and (cancelled or offset):
            # taken back in part, the rest unanswered: billed by no one until the next run
            await self._alert_split(bucket, [unanswered.why], finished=False)

    async def _step(self, row: LedgerRow, decision: Decision, actor: str) -> _Failed | None:
        """Take `row` back from the provider; None when done."""
        if decision.way is Way.HAND_BACK:
            moved = await self.storage.cancel_rows(
                [row.id], self.now(), actor, Reason.ROLLED_BACK.value, decision.note
            )
            return None if moved else _Failed("moved meanwhile", definite=True)
        if self.billing is None:
            return _Failed("no billing backend configured", definite=True)
        if row.offsets_id is not None:
            return await self._send_offset(row, actor)
        if decision.way is Way.OFFSET:
            new = await self.storage.offset_rows(
                [row.id], self.now(), actor, "rolled back past the cancel window"
            )
            if not new:
                return _Failed("moved meanwhile", definite=True)
            return await self._send_offset(new[0], actor)
        delivery = await self.billing.cancel(self._event_name(row.meter), row.identifier)
        if delivery.outcome not in _TAKEN:
            unknown = (
                "attempted without a definite answer (it may never have arrived); "
                if row.state is not RowState.SENT
                else ""
            )
            why = f"provider {delivery.outcome.value}: {delivery.message or 'no detail'}"
            return _Failed(unknown + why, definite=delivery.outcome is Outcome.REJECTED)
        moved = await self.storage.cancel_rows(
            [row.id],
            self.now(),
            actor,
            Reason.ROLLED_BACK.value,
            decision.note or "cancelled at the provider",
        )
        return None if moved else _Failed("moved meanwhile", definite=True)

    async def _send_offset(
        self, offset: LedgerRow, actor: str, stamp: int | None = None
    ) -> _Failed | None:
        """Send an offsetting row as its row was called (or at `stamp`); None when the
        provider took it (and its row is handed back, or billed again when it undoes an
        offset)."""
        customer = offset.attempt_customer
        stamp = offset.attempt_timestamp if stamp is None else stamp
        if customer is None or stamp is None:
            why = "the row it offsets was never called with a customer and timestamp"
            return _Failed(why, definite=True)
        key = offset.attempt_key or offset.identifier
        failure, taken = await self._deliver(offset, customer, stamp, key, actor)
        if taken is None:
            return failure
        if not await self.storage.complete_offsets([taken], self.now(), actor):
            why = (
                f"offset {offset.identifier} taken by the provider, but the row it offsets "
                "is no longer sent here (moved meanwhile): for a person to settle"
            )
            return _Failed(why, definite=False)
        return None

    async def _deliver(
        self, row: LedgerRow, customer: str, stamp: int, key: str, actor: str
    ) -> tuple[_Failed | None, Settlement | None]:
        """Call the provider for `row` now (an attempt recorded first). When the provider
        took it, the row's move to `sent` is returned for the caller to settle; a refusal
        holds the row."""
        assert self.billing is not None
        event = MeterEvent(
            identifier=row.identifier,
            event_name=self._event_name(row.meter),
            customer=customer,
            value=row.quantity,
            timestamp=stamp,
            idempotency_key=key,
        )
        await self.storage.record_attempts(
            [row.id], self.now(), series={row.id: Attempt(customer, stamp, key)}
        )
        delivery = await self.billing.send(event)
        message = delivery.message or "no detail"
        if delivery.outcome in _TAKEN:
            return None, Settlement(
                row.id,
                row.identifier,
                RowState.SENT,
                provider_id=delivery.provider_id,
                customer=customer,
                quantity=row.quantity,
            )
        if delivery.outcome is Outcome.REJECTED:
            refused = Settlement(
                row.id,
                row.identifier,
                RowState.HELD,
                reason=Reason.PROVIDER_REJECTED.value,
                detail=message,
                audit=AuditEntry(
                    action="ledger.held",
                    subject=row.identifier,
                    actor=actor,
                    reason=message,
                    before={"state": "pending"},
                    after={"state": "held", "reason": "provider_rejected"},
                ),
            )
            await self.storage.settle([refused], self.now())
            what = f"its offset {row.identifier}" if row.offsets_id else row.identifier
            return _Failed(f"the provider refused {what} ({message})", True), None
        why = (
            f"{row.identifier} not answered ({delivery.outcome.value}: {message}): run the "
            "rollback with --cancel-sent again to finish its bucket"
        )
        return _Failed(why, definite=False), None

    async def _restore(self, bucket: Bucket, why: str, actor: str) -> list[RowNote]:
        """Bill again, at the provider, what was taken back from a bucket that stays billed
        here: a row a rollback cancelled is re-issued (the bucket's next revision, sent now),
        an offset is undone by an offset of its own (its row is `sent` again). What cannot be
        billed again raises a ``job:rollback:split`` alert."""
        rows = await self._bucket_rows(bucket)
        by_id = {r.id: r for r in rows}
        notes: list[RowNote] = []
        failures: list[str] = []
        for row in rows:
            if (
                row.state is RowState.CANCELLED
                and row.reason == Reason.ROLLED_BACK
                and row.attempts
            ):
                failure, note = await self._reissue(row, why, actor)
            elif (
                row.state is RowState.SENT
                and (taken := by_id.get(row.offsets_id or 0)) is not None
                and (taken.state, taken.reason, taken.offsets_id)
                == (RowState.CANCELLED, Reason.OFFSET, None)
            ):
                failure, note = await self._undo_offset(row, taken, why, actor)
            else:
                continue
            notes.append(note)
            if failure is not None:
                failures.append(failure.why)
        if failures:
            await self._alert_split(bucket, failures)
        return notes

    async def _reissue(
        self, row: LedgerRow, why: str, actor: str
    ) -> tuple[_Failed | None, RowNote]:
        """Re-issue a row the provider cancelled, and send the new revision now."""
        detail = f"billed here again, its bucket stays: {why}"
        new = await self.storage.reissue_rows([row.id], self.now(), actor, detail, handed_back=True)
        customer = row.attempt_customer
        if not new or customer is None:
            return _Failed(f"{row.identifier} moved meanwhile", True), note_of(row, detail)
        rows = await self._bucket_rows((row.org_id, row.bucket_start))
        again = next(r for r in rows if r.identifier == new[0].identifier)
        stamp = await self._stamp(row)
        failure, sent = await self._deliver(again, customer, stamp, again.identifier, actor)
        if sent is not None:
            await self.storage.settle(moves.audited([sent], actor), self.now())
        note = f"handed back, then billed here again as {again.identifier}; {why}"
        return failure, note_of(row, note if failure is None else f"{note}; {failure.why}")

    async def _undo_offset(
        self, offset: LedgerRow, row: LedgerRow, why: str, actor: str
    ) -> tuple[_Failed | None, RowNote]:
        """Undo a taken offset by an offset of its own: `row` is billed here again."""
        new = await self.storage.offset_rows(
            [offset.id], self.now(), actor, f"undone, its bucket stays: {why}"
        )
        if not new:
            return _Failed(f"{offset.identifier} moved meanwhile", True), note_of(row, why)
        failure = await self._send_offset(new[0], actor, await self._stamp(row))
        note = f"offset, then billed here again ({new[0].identifier} undoes it); {why}"
        return failure, note_of(row, note if failure is None else f"{note}; {failure.why}")

    async def _stamp(self, row: LedgerRow) -> int:
        """The timestamp to bill `row`'s units again with: as it was called, unless that is
        outside its customer's open period (then now, inside it)."""
        stamp = row.attempt_timestamp if row.attempt_timestamp is not None else row.bucket_start
        period = await self._open_period(row)
        if await self._finalized(row):
            stamp = self.now()  # its invoice is final: into the current period, as the sender
        if period is None or period[0] <= stamp < period[1]:
            return stamp
        return max(period[0], min(self.now(), period[1] - 1))

    async def _finalized(self, row: LedgerRow) -> bool:
        """Whether the row's timestamp lies in a period whose invoice was finalized."""
        if row.org_id not in self._closed:
            self._closed[row.org_id] = await self.storage.closed_periods([row.org_id])
        stamp = row.attempt_timestamp if row.attempt_timestamp is not None else row.bucket_start
        return any(p.period_start <= stamp < p.period_end for p in self._closed[row.org_id])

    async def _alert_split(
        self, bucket: Bucket, failures: list[str], finished: bool = True
    ) -> None:
        org_id, start = bucket
        what = (
            "could not hand back org {org}'s bucket {start} whole, and could not bill again at "
            "the provider what it had taken back of it"
            if finished
            else "handed back part of org {org}'s bucket {start}, the rest unanswered"
        ).format(org=repr(org_id), start=start)
        text = (
            f"The rollback {what}, so that part is billed by no one (the legacy biller skips "
            "the bucket). Run the rollback with --cancel-sent again, or settle by hand: "
            f"{'; '.join(failures)}"
        )
        log.error("handback.split", org_id=org_id, bucket=start, failures=failures)
        await self.storage.record_alert(
            ParityAlert(
                meter=SPLIT_ALERTS,
                bucket_start=start,
                dedup_key=f"{SPLIT_ALERTS}:{org_id}:{start}:{self._run}",
                text=text,
                state="pending",
                created_at=self.now(),
            )
        )

    # -- credit notes ---------------------------------------------------------------------------

    async def _credit(
        self,
        group: Group,
        rows: list[LedgerRow],
        staying: dict[Bucket, str],
        actor: str,
        out: _Report,
    ) -> None:
        """Credit the group's units on its invoice, in one credit note with a line per meter,
        and hand its rows back; a note not issued leaves them billed here (their buckets
        with them). The note carries a key of its rows, so a second run finds it (an answer
        lost, or the provider's idempotency window past) instead of issuing another."""
        org_id, invoice = group
        billing = self.billing
        assert isinstance(billing, CreditNotes)
        quantities: dict[str, int] = defaultdict(int)
        for row in rows:
            quantities[row.meter] += row.quantity
        ids = sorted(r.id for r in rows)
        # the rows' key: a later run finds this note for them, and refuses to credit other
        # rows on an invoice that has a note of ours (which units it took is not known)
        key = "credit:" + hashlib.sha256(f"{invoice}:{ids}".encode()).hexdigest()
        lines = {self._event_name(m): q for m, q in sorted(quantities.items())}
        try:
            if any(q <= 0 for q in lines.values()):
                raise BillingError(f"{lines}: nothing a credit note can take off")
            noted = await billing.credit_usage(
                invoice,
                lines,
                memo="usage billed by the legacy biller after a rollback",
                key=key,
            )
            if noted.quantities != lines:
                raise BillingError(
                    f"credit note {noted.credit_note}, issued on it by an earlier rollback, "
                    f"credits {noted.quantities} while these rows hold {lines}: settle by hand"
                )
        except BillingError as exc:
            answered = (
                "no answer (a note may have been issued: run the rollback again, it finds "
                "the note; do not issue one by hand)"
                if isinstance(exc, BillingUnanswered)
                else "not issued"
            )
            why = f"credit note on {invoice} {answered}: {exc}"
            for row in rows:
                staying[(row.org_id, row.bucket_start)] = why
                out.refused[row.id] = why
                if isinstance(exc, BillingUnanswered):
                    out.unanswered.add(row.id)  # not listed "to issue": it may exist
            log.warning("handback.credit_note_refused", invoice=invoice, error=str(exc))
            return
        detail = f"credit note {noted.credit_note} on invoice {invoice}"
        await self.storage.cancel_rows(ids, self.now(), actor, Reason.CREDITED.value, detail)
        out.handed.update(ids)
        out.credited += [note_of(r, detail) for r in rows]
        customer = rows[0].attempt_customer
        for meter, quantity in sorted(quantities.items()):
            out.issued.append(
                CreditNote(
                    org_id, customer, invoice, meter, quantity,
                    sum(1 for r in rows if r.meter == meter),
                    noted.amounts.get(self._event_name(meter)), noted.currency,
                    issued=noted.credit_note,
                )
            )  # fmt: skip

    # -- the decision's inputs ----------------------------------------------------------------

    async def _find(self, now: int) -> _Found:
        """Every row the provider may have, decided: sent, or attempted without a definite
        answer (still pending, or held as `ambiguous`; not rows the provider refused); never
        an offset. With the offsets still unsent, the rows whose offset the provider refused
        and the buckets a rollback handed back in part by a call."""
        found = _Found(decided=[], unsent_offsets=await self.storage.unsent_offsets())
        found.offset_pending = {o.offsets_id for o in found.unsent_offsets if o.offsets_id}
        for state, attempted in (
            (RowState.SENT, None),
            (RowState.PENDING, True),
            (RowState.HELD, True),
            (RowState.CANCELLED, True),
        ):
            async for row in self._paged(state, attempted):
                if row.state is RowState.CANCELLED:
                    if row.offsets_id is None and row.reason in (Reason.ROLLED_BACK, Reason.OFFSET):
                        found.handed.add((row.org_id, row.bucket_start))
                elif row.offsets_id is not None:  # an offset: taking it back bills its row again
                    if row.state is RowState.HELD and row.reason == Reason.PROVIDER_REJECTED:
                        found.refused.add(row.offsets_id)
                    elif row.state is RowState.SENT:
                        found.offsets.add(row.id)
                elif row.state is not RowState.HELD or row.reason == Reason.AMBIGUOUS:
                    found.decided.append((row, await self._decide(row, now)))
        return found

    async def _paged(self, state: RowState, attempted: bool | None) -> AsyncIterator[LedgerRow]:
        after = 0
        while rows := await self.storage.ledger(
            state=state, attempted=attempted, after_id=after, limit=5000
        ):
            for row in rows:
                yield row
            after = rows[-1].id

    async def _bucket_rows(self, bucket: Bucket) -> list[LedgerRow]:
        org_id, start = bucket
        return await self.storage.ledger(org_id=org_id, start=start, end=start + 1, limit=10**6)

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

    def _event_name(self, meter: str) -> str:
        found = self.meters.by_name.get(meter)
        return found.config.provider_event_name if found else meter


def _staying(
    found: _Found, credit: bool, waiting: dict[Bucket, str] | None = None
) -> tuple[dict[Bucket, str], dict[Group, list[LedgerRow]]]:
    """The buckets that stay billed here (with why): a row of theirs stays at the provider, so
    every row of theirs is kept. When `credit`, the rows a credit note on their known invoice
    hands back instead, per (org, invoice): only for buckets whose rows at the provider all
    sit on that one invoice (one call hands them back whole, or none). `waiting`: buckets an
    unanswered offset keeps."""
    staying: dict[Bucket, str] = dict(waiting or {})
    groups: dict[Group, list[LedgerRow]] = defaultdict(list)
    called: set[Bucket] = set()  # buckets with rows handed back otherwise
    for row, decision in found.decided:
        bucket = (row.org_id, row.bucket_start)
        if row.id in found.offset_pending:
            called.add(bucket)  # its offset may have been applied: never credited as well
        elif decision.way is Way.CREDIT_NOTE and credit and decision.invoice_id:
            groups[(row.org_id, decision.invoice_id)].append(row)
        elif decision.way in (Way.CREDIT_NOTE, Way.KEEP):
            staying.setdefault(bucket, f"{row.identifier} stays billed at the provider")
        elif row.id in found.refused:
            staying.setdefault(bucket, f"the provider refused the offset of {row.identifier}")
        else:
            called.add(bucket)
    invoices: dict[Bucket, set[Group]] = defaultdict(set)
    for group, rows in groups.items():
        for row in rows:
            invoices[(row.org_id, row.bucket_start)].add(group)

    def whole(bucket: Bucket) -> bool:
        return bucket not in staying and bucket not in called and len(invoices[bucket]) == 1

    while dropped := [
        g for g, rows in groups.items() if not all(whole((r.org_id, r.bucket_start)) for r in rows)
    ]:
        for group in dropped:
            for row in groups.pop(group):
                why = f"{row.identifier} stays billed at the provider (not credited: its "
                staying.setdefault((row.org_id, row.bucket_start), why + "buckets are mixed)")
    return staying, dict(groups)
