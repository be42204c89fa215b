"""Reconciliation: the ledger's sent rows against the provider's own aggregates.

`sent` means the provider answered; only its aggregates (Stripe's meter event summaries) say
what it will invoice. For a window of whole hours, older than ``[reconcile] settle_seconds``
(the summaries are eventually consistent), every ledger row sent with a timestamp in the
window is counted per (org, customer, meter, hour of its timestamp): the customer and the
timestamp are those of its first attempt, which every retry reuses (``attempt_customer``,
``attempt_timestamp``), so a correction stamped into a later period is matched where it was
sent. For every (customer, meter) with such rows, the provider's hourly aggregates are read
once (paged) and compared cell by cell:

======  ===================================================================
short   the provider holds fewer units than the ledger sent: under billing
over    the provider holds more (an event made outside the control plane, or
        a cancel the ledger does not know of): double billing
======  ===================================================================

Each run is stored with its findings; ``clean`` when none. What it cannot see: usage changed at
the provider after the run read it, customers with no sent rows in the window, and hours older
than the provider keeps summaries for. Findings are reported (metrics, alert, API, CLI), never
repaired silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import msgspec
import structlog

from controlplane.errors import InvalidInput, Problem
from controlplane.interfaces import (
    Finding,
    LedgerStore,
    MeterSummaries,
    ParityAlert,
    ParityStore,
    ReconcileRun,
    ReconcileStore,
)
from controlplane.ledger import RowState

log = structlog.get_logger("reconcile")

HOUR = 3600
PAGE = 5000
RECONCILE_ALERTS = "job:reconcile:findings"  # delivered by the job watcher

Cell = tuple[str, str, str, int]  # org, customer, meter, hour


def window_problems(start: int | None, end: int | None) -> list[Problem]:
    """What is wrong with a window [start, end) to reconcile: whole hours, start before end."""
    problems = []
    for field, value in (("from", start), ("to", end)):
        if value is None:
            problems.append(Problem(field=field, message="required"))
        elif value % HOUR:
            problems.append(Problem(field=field, message=f"{value} is not on an hour boundary"))
    if not problems and start is not None and end is not None and start >= end:
        problems.append(Problem(field="to", message="must be after `from`"))
    return problems


def compare(
    ledger: Mapping[Cell, int], provider: Mapping[tuple[str, str], Mapping[int, int]]
) -> tuple[list[Finding], int]:
    """The findings (pure): each cell where the ledger's units and the provider's differ, and
    how many cells were compared. `provider` is per (customer, meter): hour -> units; an hour
    the provider holds for a customer is the org's whose rows went to that customer (the
    first, by org id, when several orgs' rows did: one customer bills one org)."""
    owner: dict[tuple[str, str], str] = {}
    for org, customer, meter, _ in sorted(ledger):
        owner.setdefault((customer, meter), org)
    cells = dict(ledger)
    for (customer, meter), hours in provider.items():
        for hour in hours:
            cells.setdefault((owner.get((customer, meter), ""), customer, meter, hour), 0)
    findings = []
    for cell in sorted(cells):
        org, customer, meter, hour = cell
        sent = cells[cell]
        held = provider.get((customer, meter), {}).get(hour, 0)
        if held != sent:
            status = "short" if held < sent else "over"
            findings.append(Finding(org, customer, meter, hour, sent, held, status))
    return findings, len(cells)


async def reconcile(
    ledger: LedgerStore,
    runs: ReconcileStore,
    provider: MeterSummaries,
    event_names: Mapping[str, str],
    *,
    start: int,
    end: int,
    now: int,
    settle_seconds: int,
    org_id: str | None = None,
) -> ReconcileRun:
    """Reconcile [start, end) up to the last settled hour; store and return the run.
    `event_names` maps each meter to the provider's event name."""
    problems = window_problems(start, end)
    if problems:
        raise InvalidInput(problems)
    settled = (now - settle_seconds) // HOUR * HOUR
    end = min(end, settled)
    cells: Counter[Cell] = Counter()
    after = 0
    while end > start and (
        rows := await ledger.ledger(org_id=org_id, state=RowState.SENT, after_id=after, limit=PAGE)
    ):
        for row in rows:
            stamp, customer = row.attempt_timestamp, row.attempt_customer
            if stamp is not None and customer is not None and start <= stamp < end:
                cells[(row.org_id, customer, row.meter, stamp - stamp % HOUR)] += row.quantity
        after = rows[-1].id
    pairs = sorted({(customer, meter) for _, customer, meter, _ in cells})
    held: dict[tuple[str, str], dict[int, int]] = {}
    for customer, meter in pairs:
        name = event_names.get(meter, meter)
        held[(customer, meter)] = await provider.hourly_usage(customer, name, start, end)
    findings, compared = compare(cells, held) if end > start else ([], 0)
    run = ReconcileRun(
        checked_at=now,
        start=start,
        end=max(start, end),
        org_id=org_id,
        customers=len(pairs),
        hours=compared,
        units_short=sum(f.ledger - f.provider for f in findings if f.status == "short"),
        units_over=sum(f.provider - f.ledger for f in findings if f.status == "over"),
        clean=not findings,
        findings=findings,
    )
    run_id = await runs.record_reconcile_run(run)
    return msgspec.structs.replace(run, id=run_id)


async def alert(store: ParityStore, run: ReconcileRun, tolerance: int, *, pending: bool) -> None:
    """Alert (once per run) when the units short or over exceed `tolerance`; delivered by the
    job watcher when an alert webhook is configured (`pending`), else logged."""
    if max(run.units_short, run.units_over) <= tolerance:
        return
    worst = ", ".join(
        f"{f.org_id or '?'}/{f.customer} {f.meter} at {f.hour}: {f.status} "
        f"{abs(f.ledger - f.provider)}"
        for f in run.findings[:5]
    )
    text = (
        f"Reconciliation of [{run.start}, {run.end}): {run.units_short} units short at the "
        f"provider (under billing), {run.units_over} over (double billing), in "
        f"{len(run.findings)} org-hours; first: {worst}"
    )
    log.warning("reconcile.findings", short=run.units_short, over=run.units_over, text=text)
    await store.record_alert(
        ParityAlert(
            meter=RECONCILE_ALERTS,
            bucket_start=run.start,
            dedup_key=f"{RECONCILE_ALERTS}:{run.id}",
            text=text,
            state="pending" if pending else "logged",
            created_at=run.checked_at,
        )
    )


def clean_since(runs: list[ReconcileRun]) -> int | None:
    """The start of the oldest window in the newest unbroken series of clean runs (newest
    first in `runs`); None when the newest run is not clean or there is none."""
    since = None
    for run in runs:
        if not run.clean:
            break
        since = run.start
    return since


def run_api(run: ReconcileRun) -> dict[str, object]:
    out: dict[str, object] = msgspec.to_builtins(run)
    out["status"] = "clean" if run.clean else "mismatch"
    return out
