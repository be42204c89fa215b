"""How a rollback hands each row the provider may hold back to the legacy biller (DESIGN §6).

After a rollback the legacy biller bills every bucket whose rows are no longer `sent`, so a
row may be handed back only once the provider will not bill it. Per row (pure; the rules and
their sources are in ``docs/reference/stripe-corrections.md``):

===========  ===============================================================================
hand_back    never delivered (below one unit: sent without a call) inside the window: nothing
             to undo (past it, kept with the rows that carry its fraction)
cancel       reached the provider inside ``[cutover] cancel_window_seconds``: a meter event
             adjustment cancels it (CAN-1, CAN-4: within 24 hours of receipt)
offset       sent past the window, its timestamp in the customer's current, open billing period
             (as the provider's invoice preview says) and within the provider's 35 days: an
             event of its negative value, stamped as it was, takes it out of the period's
             total before the invoice is finalized (NEG-1, NEG-6, NEG-11, GR-1)
credit_note  sent past the window into a finalized period, a period not known to be open, or
             older than the provider takes an offset: it stays `sent` (the legacy biller skips
             it) and is listed for a credit note, with its invoice when known (CN-1, CAN-7)
keep         attempted without a definite answer, past the window: an offset could take units
             the provider never counted, so it stays as it is until reconciliation settles it
===========  ===============================================================================

An offset is only made for `sum` meters (every meter the product publishes is one, NEG-7 and
NEG-8 rule out the others) and never for an offsetting row itself.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from controlplane.interfaces import ClosedPeriod
from controlplane.ledger import LedgerRow, RowState
from controlplane.pricing import Price, line_amount
from controlplane.units import format_micros

MAX_OFFSET_AGE = 35 * 86400 - 3600  # the provider's timestamp window, less an hour's margin


class Way(enum.StrEnum):
    HAND_BACK = "hand_back"
    CANCEL = "cancel"
    OFFSET = "offset"
    CREDIT_NOTE = "credit_note"
    KEEP = "keep"


class Decision(msgspec.Struct, frozen=True):
    way: Way
    note: str | None = None  # why, for the rollback's listing
    invoice_id: str | None = None  # the finalized invoice that holds it (credit_note)


def way_back(
    row: LedgerRow,
    *,
    now: int,
    cancel_window: int,
    open_period: tuple[int, int] | None,
    closed: Sequence[ClosedPeriod],
) -> Decision:
    """How `row` (sent, or attempted without a definite answer) is handed back; `open_period`
    is its customer's current billing period [start, end) as the provider says it, None when
    unknown; `closed` the org's finalized periods."""
    attempted = row.state is not RowState.SENT
    # the provider's window runs from its receipt: the first attempt, when one was made
    since = row.first_attempt_at if row.first_attempt_at is not None else row.sent_at
    recent = since is not None and since > now - cancel_window
    what = "first attempted" if attempted or row.first_attempt_at != row.sent_at else "sent"
    past = f"{what} more than {cancel_window} s ago"
    if not row.attempts:  # sent without a call: below one unit
        if recent:
            return Decision(
                Way.HAND_BACK, "never delivered (below one unit): handed back without a call"
            )
        return Decision(Way.KEEP, f"{past}: kept with the rows that carry its fraction")
    if recent:
        return Decision(Way.CANCEL)
    if attempted:
        return Decision(
            Way.KEEP,
            f"attempted without a definite answer (it may never have arrived), {past}: "
            "reconciliation settles whether the provider holds it",
        )
    if row.attempt_key is not None and row.attempt_key != row.identifier:
        return Decision(
            Way.CREDIT_NOTE,
            f"{past}, its calls re-stamped into a later period: which invoice holds it is not "
            "known here",
        )
    stamp = row.attempt_timestamp if row.attempt_timestamp is not None else row.bucket_start
    final = next((p for p in closed if p.period_start <= stamp < p.period_end), None)
    if final is not None:
        return Decision(
            Way.CREDIT_NOTE,
            f"{past}, on invoice {final.invoice_id}, finalized at {final.finalized_at}",
            final.invoice_id,
        )
    if stamp <= now - MAX_OFFSET_AGE:
        return Decision(Way.CREDIT_NOTE, f"{past}, stamped {stamp}: older than the provider takes")
    if open_period is None:
        return Decision(Way.CREDIT_NOTE, f"{past}; its customer's open billing period is not known")
    start, end = open_period
    if not start <= stamp < end:
        return Decision(
            Way.CREDIT_NOTE,
            f"{past}, stamped {stamp}: outside the customer's open period [{start}, {end})",
        )
    return Decision(Way.OFFSET)


class CreditNote(msgspec.Struct, frozen=True):
    """What a credit note would take off one customer's invoice for one meter: the units
    (``quantity`` of the metered line, CN-5) and their amount at the catalog's price."""

    org_id: str
    customer: str | None
    invoice_id: str | None  # None: the invoice is not known here (find it at the provider)
    meter: str
    quantity: int
    rows: int
    amount_minor: int | None  # None: no published price charges this meter
    currency: str | None
    issued: str | None = None  # the provider's credit note, once created (the amount is its)


def credit_notes(
    listed: Iterable[tuple[LedgerRow, str | None]], prices: Mapping[str, Price]
) -> list[CreditNote]:
    """The listed rows (each with its invoice, when known) summed per (org, customer, invoice,
    meter), priced with `prices` (by meter) as Stripe prices a metered line."""
    sums: dict[tuple[str, str | None, str | None, str], list[int]] = {}
    for row, invoice in listed:
        key = (row.org_id, row.attempt_customer, invoice, row.meter)
        total = sums.setdefault(key, [0, 0])
        total[0] += row.quantity
        total[1] += 1
    out = []
    for (org_id, customer, invoice, meter), (quantity, rows) in sorted(
        sums.items(), key=lambda kv: tuple(str(k) for k in kv[0])
    ):
        price = prices.get(meter)
        amount = line_amount(price.unit_minor, quantity) if price else None
        currency = price.currency if price else None
        out.append(CreditNote(org_id, customer, invoice, meter, quantity, rows, amount, currency))
    return out


class RowNote(msgspec.Struct, frozen=True):
    identifier: str
    org_id: str
    meter: str
    bucket_start: int
    quantity: int
    value: str
    sent_at: int | None
    note: str | None = None


def note_of(row: LedgerRow, note: str | None) -> RowNote:
    return RowNote(
        identifier=row.identifier,
        org_id=row.org_id,
        meter=row.meter,
        bucket_start=row.bucket_start,
        quantity=row.quantity,
        value=format_micros(row.value_micros),
        sent_at=row.sent_at,
        note=note,
    )


class HandedBack(msgspec.Struct, frozen=True):
    """What a hand-back did."""

    cancelled: list[RowNote]  # cancelled at the provider (or never delivered): legacy bills them
    offset: list[RowNote]  # offset in their open period (the note names the offset): the same
    not_cancelled: list[RowNote]  # still at the provider: a credit note, or reconciliation
    credit_notes: list[CreditNote]  # per customer, invoice and meter: issued, or to issue
    credited: list[RowNote] = []  # handed back through a credit note on their invoice


class RollbackPreview(msgspec.Struct, frozen=True):
    """What a rollback with ``cancel_sent`` would do now (:meth:`HandBack.preview`)."""

    to_cancel: list[LedgerRow]  # inside the cancel window: cancelled at the provider
    to_cancel_count: int
    to_offset: list[LedgerRow]  # past it, in an open period: offset
    to_offset_count: int
    credit_notes: list[LedgerRow]  # past it otherwise: listed for credit notes (or kept)
    credit_notes_count: int
