"""Usage that missed its invoice: sent after the provider finalized the period's invoice.

Stripe finalizes an invoice on its own clock; the control plane hears of it from
``invoice.finalized``, possibly minutes later. A row sent in between, stamped inside that
period, is at the provider but on no invoice: Stripe does not re-invoice a finalized period.
When the webhook arrives, each such row is re-issued: cancelled at the provider (inside its
24 h window; else left where no invoice carries it, and the ledger says so) and replaced by
the next revision of its bucket, with the same usage, which the sender stamps into the
current period. The ledger keeps the usage in exactly one row that bills it.
"""

from __future__ import annotations

import structlog

from controlplane.interfaces import Billing, ClosedPeriod, Outcome, ParityAlert, Storage
from controlplane.ledger import NewRow
from controlplane.meters import MeterSet

log = structlog.get_logger("invoices")


async def reissue_late(
    storage: Storage,
    billing: Billing | None,
    meters: MeterSet,
    period: ClosedPeriod,
    *,
    at: int,
    actor: str,
) -> list[NewRow]:
    """Re-issue the rows that reached the provider after `period`'s invoice was finalized.
    Returns the revisions appended (the sender delivers them). Rows whose arrival cannot be
    placed before or after the finalization are alerted, never guessed (:func:`alert_unsure`)."""
    await alert_unsure(storage, period, at)
    late = await storage.late_rows(period)
    if not late:
        return []
    missed = (
        f"reached the provider after invoice {period.invoice_id} was finalized (at "
        f"{period.finalized_at}), so no invoice carries it; cancelled at the provider where "
        "it allows (within 24 h), else left in the finalized period"
    )
    # The ledger first: a crash after it leaves at most an event Stripe never invoices.
    new = await storage.reissue_rows([r.id for r in late], at, actor, missed)
    cancelled = 0
    for row in late:
        meter = meters.by_name.get(row.meter)
        event_name = meter.config.provider_event_name if meter else row.meter
        delivery = None if billing is None else await billing.cancel(event_name, row.identifier)
        if delivery is not None and delivery.outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE):
            cancelled += 1
        else:
            log.warning(
                "ledger.reissued_not_cancelled",
                identifier=row.identifier,
                outcome=delivery.outcome.value if delivery else "no billing backend",
            )
    log.warning(
        "ledger.reissued",
        invoice=period.invoice_id,
        org=period.org_id,
        rows=len(new),
        cancelled_at_provider=cancelled,
    )
    return new


UNSURE_ALERTS = "job:invoices:unsure"  # delivered by the job watcher


async def alert_unsure(storage: Storage, period: ClosedPeriod, at: int) -> None:
    """Rows answered "already exists" by a call made after the invoice was finalized while an
    earlier call came before: the first may have arrived in time (on the invoice) or not (on
    no invoice). Re-issuing could bill them twice, leaving them could bill them never: say
    which, once per invoice, for a person to compare the invoice's metered quantity with
    them."""
    unsure = await storage.unsure_rows(period)
    if not unsure:
        return
    shown = ", ".join(r.identifier for r in unsure[:10]) + (" ..." if len(unsure) > 10 else "")
    text = (
        f"{len(unsure)} rows of org {period.org_id!r} stamped in the period of invoice "
        f"{period.invoice_id} were answered 'already exists' (or with an earlier call's "
        "replayed answer) by a call made after it was "
        f"finalized (at {period.finalized_at}), an earlier call having come before: whether "
        f"the invoice carries them is not known here. Compare its metered quantity with "
        f"these rows, then credit or re-issue by hand: {shown}"
    )
    log.warning("invoices.unsure", invoice=period.invoice_id, rows=len(unsure))
    await storage.record_alert(
        ParityAlert(
            meter=UNSURE_ALERTS,
            bucket_start=period.period_start,
            dedup_key=f"{UNSURE_ALERTS}:{period.invoice_id}",
            text=text,
            state="pending",
            created_at=at,
        )
    )
