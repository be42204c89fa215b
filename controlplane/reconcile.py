"""Reconciliation: the ledger's sent rows against the provider's own aggregates.

`sent` means the provider answered; only its aggregates (Stripe's meter event summaries) say
what it will invoice. For a window of whole hours, older than ``[reconcile] settle_seconds``
(the summaries are eventually consistent), every ledger row sent with a timestamp in the
window is counted per (org, customer, meter, hour of its timestamp): the customer and the
timestamp are those of its first attempt, which every retry reuses (``attempt_customer``,
``attempt_timestamp``), so a correction stamped into a later period is matched where it was
sent. For every (customer, meter) with such rows, the provider's hourly aggregates are read
once (paged) and compared cell by cell, except cells with a call made within the settle period
(a backlog sent at a cutover, a repair, an offset: the aggregates may not show it yet), which
wait for a later run. Rows a rollback cancelled count 0 but bring their cell into the run, so a
cancel the provider did not apply shows as units over:

======  ===================================================================
short   the provider holds fewer units than the ledger sent: under billing
over    the provider holds more (an event made outside the control plane, or
        a cancel the ledger does not know of): double billing
======  ===================================================================

Each run is stored with its findings; ``clean`` when none. What it cannot see: usage changed at
the provider after the run read it, customers with no sent rows in the window, and hours older
than the provider keeps summaries for.

Every finding is attributed, when it can be, to the hour's own rows (the fewest whose
quantities make up the difference; the provider counts whole events) and given a remedy:

============  ==========================================================================
held          short: the rows the provider lacks move to `held`/`provider_missing` (they
              are not billed; the run after sees the hour clean)
found         over: rows held as `provider_missing` or `ambiguous` that the provider holds
              after all move back to `sent`
cancel        over: rows the ledger cancelled (a rollback, a re-issue) that the provider
              still holds, inside its cancel window: a repair cancels them again
credit_note   over, past the cancel window, or usage the ledger never sent: listed for a
              credit note
unattributed  short, and no set of the hour's rows makes up the difference: for a person
============  ==========================================================================

`held` and `found` are applied by the run itself, each row audited (``ledger.held``,
``ledger.found``): they make the ledger say what the provider holds. A **repair** (``[reconcile]
repair = "resend"`` after each scheduled run, or ``controlplane reconcile repair --apply``)
re-issues the `provider_missing` rows under new identifiers (the provider keeps the old ones:
a resend under one would be answered "already exists" and bill nothing), so exactly the
missing units are sent once, and cancels the `cancel` findings of the newest run; it is one
audited action (``reconcile.repaired``) and re-running it does nothing more. The scheduled
repair re-issues only rows held for at least ``settle_seconds`` (a hold a later run did not
undo as `found`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import msgspec
import structlog

from controlplane.config import Config
from controlplane.errors import ConfigError, InvalidInput, Problem
from controlplane.interfaces import (
    AuditEntry,
    Billing,
    Finding,
    MeterSummaries,
    Outcome,
    ParityAlert,
    ParityStore,
    ReconcileRun,
    ReconcileStore,
    RowMove,
    Storage,
)
from controlplane.ledger import LedgerRow, Reason, RowState
from controlplane.ratelimit import RateLimiter

log = structlog.get_logger("reconcile")

HOUR = 3600
RECONCILE_ALERTS = "job:reconcile:findings"  # delivered by the job watcher

Cell = tuple[str, str, str, int]  # org, customer, meter, hour
ACTOR = "reconciler"
READERS = 8  # summary reads in flight at once
SUMMARIES_PAGE = 100  # summaries per page read (Stripe's largest `limit`)
MAX_ATTRIBUTED_ROWS = 16  # an hour's rows searched for the set that makes up a difference


class Remedy(enum.StrEnum):
    """What the ledger does about a finding (see the module docstring)."""

    HELD = "held"
    FOUND = "found"
    CANCEL = "cancel"
    CREDIT_NOTE = "credit_note"
    UNATTRIBUTED = "unattributed"


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


def rows_making_up(rows: Sequence[LedgerRow], units: int) -> list[LedgerRow] | None:
    """The fewest of `rows` whose quantities sum to `units`, preferring the newest (the
    provider counts whole events, so a difference is some set of them), oldest first; None
    when no set does or there are too many rows to search."""
    live = [r for r in rows if r.quantity]
    if units == 0 or len(live) > MAX_ATTRIBUTED_ROWS:
        return None
    for size in range(1, len(live) + 1):
        for chosen in combinations(reversed(live), size):
            if sum(r.quantity for r in chosen) == units:
                return sorted(chosen, key=lambda r: r.id)
    return None


_UNSENT = (Reason.PROVIDER_MISSING, Reason.AMBIGUOUS)
# cancelled rows the provider should no longer hold (it holds offset and credited ones still,
# and re-issued ones were never counted or counted in a finalized period)
_CANCELLED_HERE = (Reason.ROLLED_BACK,)


def restamped(row: LedgerRow) -> bool:
    """Whether the row's calls were repeated under a later timestamp (a new idempotency key):
    where the provider holds it, at the first timestamp or the last, is not known here."""
    return row.attempt_key is not None and row.attempt_key != row.identifier


def attribute(
    finding: Finding, rows: Sequence[LedgerRow], *, now: int, cancel_window: int
) -> Finding:
    """The finding with its remedy and the rows it moves (pure; see the module docstring);
    `rows` are the hour's rows of the finding's (org, meter) called for its customer."""

    def given(remedy: Remedy, chosen: Sequence[LedgerRow] = ()) -> Finding:
        ids = [r.identifier for r in chosen]
        return msgspec.structs.replace(finding, remedy=remedy.value, rows=ids)

    if finding.status == "short":
        # a re-stamped row (its call repeated with a later timestamp) answered "already
        # exists" is held by the provider at its earlier timestamp, and an offset goes with its
        # row: neither is taken as missing
        sent = [
            r
            for r in rows
            if r.state is RowState.SENT and not restamped(r) and r.offsets_id is None
        ]
        chosen = rows_making_up(sent, finding.ledger - finding.provider)
        return given(Remedy.HELD, chosen) if chosen else given(Remedy.UNATTRIBUTED)
    excess = finding.provider - finding.ledger
    unsent = [r for r in rows if r.state is RowState.HELD and r.reason in _UNSENT]
    if chosen := rows_making_up(unsent, excess):
        return given(Remedy.FOUND, chosen)
    cancelled = [
        r
        for r in rows
        if r.state is RowState.CANCELLED and r.attempts and r.reason in _CANCELLED_HERE
    ]
    if chosen := rows_making_up(cancelled, excess):
        # the provider's cancel window runs from receipt, which is no earlier than the
        # first attempt: inside it counted from there, inside it for sure
        recent = all((r.first_attempt_at or 0) > now - cancel_window for r in chosen)
        return given(Remedy.CANCEL if recent else Remedy.CREDIT_NOTE, chosen)
    return given(Remedy.CREDIT_NOTE)


def moves(finding: Finding, rows: Sequence[LedgerRow]) -> list[RowMove]:
    """The ledger moves of a `held` or `found` finding, each with its audit record."""
    chosen = [r for r in rows if r.identifier in finding.rows]
    when = f"hour {finding.hour}, customer {finding.customer}"
    if finding.remedy == Remedy.HELD:
        detail = (
            f"the provider holds {finding.provider} of the {finding.ledger} units sent ({when})"
        )
        to: tuple[RowState, str | None, str] = (RowState.HELD, Reason.PROVIDER_MISSING, "held")
    elif finding.remedy == Remedy.FOUND:
        detail = f"the provider holds it after all ({when}): {finding.provider} units"
        to = (RowState.SENT, None, "found")
    else:
        return []
    state, reason, action = to
    return [
        RowMove(
            row_id=r.id,
            expect_state=r.state.value,
            expect_reason=r.reason,
            state=state.value,
            reason=reason,
            detail=detail,
            audit=AuditEntry(
                action=f"ledger.{action}",
                subject=r.identifier,
                actor=ACTOR,
                reason=detail,
                before={"state": r.state.value, "reason": r.reason},
                after={"state": state.value, "reason": reason, "quantity": r.quantity},
            ),
        )
        for r in chosen
    ]


async def _hour_rows(runs: ReconcileStore, f: Finding) -> list[LedgerRow]:
    if not f.org_id:  # usage at the provider for a customer no row of the window went to
        return []
    return await runs.stamped_rows(f.org_id, f.meter, f.customer, f.hour, f.hour + HOUR)


async def reconcile(
    runs: ReconcileStore,
    provider: MeterSummaries,
    event_names: Mapping[str, str],
    *,
    start: int,
    end: int,
    now: int,
    settle_seconds: int,
    cancel_window: int,
    rate: float | None = None,
    org_id: str | None = None,
) -> ReconcileRun:
    """Reconcile [start, end) up to the last settled hour; attribute each finding, apply its
    `held` and `found` moves, store and return the run. `event_names` maps each meter to the
    provider's event name; `cancel_window` is how long after receipt the provider cancels;
    `rate` the calls per second the billing plugin allows (the reads stay inside it, at most
    `READERS` in flight)."""
    problems = window_problems(start, end)
    if problems:
        raise InvalidInput(problems)
    settled = (now - settle_seconds) // HOUR * HOUR
    end = min(end, settled)
    cells: dict[Cell, int] = {}
    unsettled: set[tuple[str, str, int]] = set()  # (customer, meter, hour) called too recently
    if end > start:
        for c in await runs.sent_cells(start, end, org_id):
            if c.last_attempt_at is not None and c.last_attempt_at > now - settle_seconds:
                unsettled.add((c.customer, c.meter, c.hour))
            else:
                cells[(c.org_id, c.customer, c.meter, c.hour)] = c.units
    pairs = sorted({(customer, meter) for _, customer, meter, _ in cells})
    limiter, readers = RateLimiter(rate), asyncio.Semaphore(READERS)
    pages = -(-(end - start) // HOUR // SUMMARIES_PAGE)  # one summary an hour, 100 a page

    async def read(customer: str, meter: str) -> dict[int, int]:
        async with readers:
            for _ in range(pages):  # the plugin pages on its own: each page is one call
                await limiter.wait()
            return await provider.hourly_usage(customer, event_names.get(meter, meter), start, end)

    read_all = await asyncio.gather(*(read(customer, meter) for customer, meter in pairs))
    held = {
        (customer, meter): {h: u for h, u in hours.items() if (customer, meter, h) not in unsettled}
        for (customer, meter), hours in zip(pairs, read_all, strict=True)
    }
    findings, compared = compare(cells, held) if end > start else ([], 0)
    attributed, to_move = [], []
    for finding in findings:
        rows = await _hour_rows(runs, finding)
        attributed.append(attribute(finding, rows, now=now, cancel_window=cancel_window))
        to_move += moves(attributed[-1], rows)
    await runs.move_rows(to_move, now)
    findings = attributed
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


class Repair(msgspec.Struct, frozen=True):
    """What a repair did, or (not `applied`) would do."""

    applied: bool
    run_id: int | None  # the newest run, whose `cancel` and `credit_note` findings it took
    reissued: list[str]  # the `provider_missing` rows re-issued...
    reissued_as: list[str]  # ...as these new pending rows, in the same order
    cancelled: list[str]  # cancelled again at the provider
    not_cancelled: list[str]  # the provider refused the cancel: for a credit note
    credit_notes: list[Finding]  # over at the provider, past any cancel: for a credit note
    repaired_before: bool = False  # the run's cancels were made by an earlier repair


class Reconciler:
    """Reconciliation over the storage contracts and the billing plugin: runs, the scheduled
    pass (with its repair when ``repair = "resend"``) and repairs."""

    def __init__(
        self,
        store: Storage,
        billing: Billing | None,
        config: Config,
        *,
        now: Callable[[], int],
        count: Callable[[ReconcileRun], None],
    ) -> None:
        self.store, self.billing, self.config, self.now, self.count = (
            store,
            billing,
            config,
            now,
            count,
        )
        self.settings = config.reconcile
        self.event_names = {m.name: m.provider_event_name for m in config.meters}

    def _provider(self) -> MeterSummaries:
        if not isinstance(self.billing, MeterSummaries):
            why = "the billing plugin cannot read the provider's aggregates (backend stripe)"
            raise ConfigError(f"reconcile: {why}")
        return self.billing

    def _provider_rate(self) -> float | None:
        return self.billing.rate_limit if self.billing is not None else None

    async def run(self, start: int, end: int, org_id: str | None = None) -> ReconcileRun:
        """Reconcile [start, end) (see the module docstring); stored, counted and alerted."""
        run = await reconcile(
            self.store,
            self._provider(),
            self.event_names,
            start=start,
            end=end,
            now=self.now(),
            settle_seconds=self.settings.settle_seconds,
            cancel_window=self.config.cutover.cancel_window_seconds,
            rate=self._provider_rate(),
            org_id=org_id,
        )
        self.count(run)
        webhook = self.config.parity.alert.webhook_url is not None  # delivered, else logged
        await alert(self.store, run, self.settings.tolerance_units, pending=webhook)
        return run

    async def scheduled(self) -> ReconcileRun:
        """The scheduled pass: the last `window_hours` settled hours, then, with ``repair =
        "resend"``, a repair of the rows held for at least `settle_seconds`."""
        settled = (self.now() - self.settings.settle_seconds) // HOUR * HOUR
        run = await self.run(settled - self.settings.window_hours * HOUR, settled)
        if self.settings.repair == "resend":
            held_before = self.now() - self.settings.settle_seconds
            await self.repair(apply=True, actor=ACTOR, held_before=held_before)
        return run

    async def runs(self, limit: int = 50) -> list[ReconcileRun]:
        """Stored reconciliations, the newest first."""
        return await self.store.reconcile_runs(limit=limit)

    async def repair(self, *, apply: bool, actor: str, held_before: int | None = None) -> Repair:
        """Re-issue the `provider_missing` rows (held at or before `held_before`, when given)
        and cancel again the newest run's `cancel` findings; list its `credit_note` ones. Not
        `apply`: what it would do, changing nothing. One audited action; re-running it does
        nothing more."""
        at = self.now()
        held = [
            r
            for r in await self._held_missing()
            if held_before is None or r.updated_at <= held_before
        ]
        newest = await self.store.reconcile_runs(limit=1)
        run = newest[0] if newest else None
        findings = run.findings if run else []
        to_cancel = [f for f in findings if f.remedy == Remedy.CANCEL]
        before = run is not None and await self._repaired(run)
        if before:
            to_cancel = []
        listed = [f for f in findings if f.remedy == Remedy.CREDIT_NOTE]
        if not apply:
            ids = [i for f in to_cancel for i in f.rows]
            run_id = run.id if run else None
            return Repair(False, run_id, [r.identifier for r in held], [], ids, [], listed, before)
        new = await self.store.reissue_rows(
            [r.id for r in held], at, actor, "missing at the provider (reconciliation)"
        )
        cancelled, refused = await self._cancel(to_cancel)
        result = Repair(
            True,
            run.id if run else None,
            [r.identifier for r in held],
            [n.identifier for n in new],
            cancelled,
            refused,
            listed,
            before,
        )
        if held or to_cancel:
            await self.store.append_audit([_repair_audit(result, actor)], at)
        log.info("reconcile.repaired", reissued=len(new), cancelled=len(cancelled))
        return result

    async def _held_missing(self) -> list[LedgerRow]:
        rows: list[LedgerRow] = []
        after = 0
        while page := await self.store.ledger(state=RowState.HELD, after_id=after, limit=5000):
            rows += [r for r in page if r.reason == Reason.PROVIDER_MISSING]
            after = page[-1].id
        return rows

    async def _repaired(self, run: ReconcileRun) -> bool:
        """Whether an earlier repair took this run's findings."""
        done = await self.store.audit_log(action_prefix="reconcile.repaired", limit=200)
        return any(r.subject == _run_subject(run.id) for r in done)

    async def _cancel(self, findings: Sequence[Finding]) -> tuple[list[str], list[str]]:
        cancelled: list[str] = []
        refused: list[str] = []
        if self.billing is None:
            return cancelled, [i for f in findings for i in f.rows]
        for f in findings:
            for identifier in f.rows:
                name = self.event_names.get(f.meter, f.meter)
                delivery = await self.billing.cancel(name, identifier)
                ok = delivery.outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE)
                (cancelled if ok else refused).append(identifier)
        return cancelled, refused


def _run_subject(run_id: int | None) -> str:
    return f"reconcile run {run_id}" if run_id is not None else "reconcile"


def _repair_audit(repair: Repair, actor: str) -> AuditEntry:
    return AuditEntry(
        action="reconcile.repaired",
        subject=_run_subject(repair.run_id),
        actor=actor,
        reason="reconciliation repair",
        before={
            "provider_missing": repair.reissued,
            "to_cancel": repair.cancelled + repair.not_cancelled,
        },
        after={
            "reissued_as": repair.reissued_as,
            "cancelled": repair.cancelled,
            "not_cancelled": repair.not_cancelled,
            "credit_notes": len(repair.credit_notes),
        },
    )
