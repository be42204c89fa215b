"""Sender: deliver pending ledger rows to the billing provider, at most once each.

Sends when the flags say the control plane bills (shadow off, authority `controlplane`) and a
boundary T (`bill_from`) is set. A bucket billed here (it has a `sent` row, of any meter) is the
control plane's whole, whatever the flags say since (a rollback that kept it, a later T): the
legacy biller skips it (the seam), so its corrections are sent even while the flags send
nothing else, and never excluded as before T. Per row, in order of decision:

- bucket before T, not billed here      -> `excluded` / `before_bill_from`
- older than the provider accepts        -> `excluded` / `too_old` (no call)
- org has no provider customer           -> `held` / `no_customer` (pending again once it has one)
- attempted before, longer ago than the
  provider remembers identifiers         -> `held` / `ambiguous` (never resent blind)
- quantity 0 (usage below one unit,
  carried to the next row)               -> `sent` without a call
- otherwise delivered: the attempt is recorded first, then the provider is called with the
  row identifier as identifier and idempotency key; accepted or "already exists" -> `sent`,
  permanent refusal -> `held` / `provider_rejected`, transient or ambiguous -> stays pending.

At most one call is in flight per (customer, meter), as Stripe requires, with concurrency
across customers and a client-side rate limit. A held row never blocks newer rows.

Several senders (replicas on one shared store) split the work by claims: each pass claims the
rows it reads, for `claim_seconds`, and no two senders work on the same (org, meter) at once.
A sender that dies leaves claims that lapse; another sender then takes the rows over.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import structlog

from controlplane import moves
from controlplane.flags.resolve import Snapshot
from controlplane.flags.service import versions_of
from controlplane.interfaces import (
    Attempt,
    Billing,
    Claim,
    ClosedPeriod,
    FlagsChanged,
    MeterEvent,
    Outcome,
    SendItem,
    Settlement,
    Storage,
)
from controlplane.invoices import reissue_late
from controlplane.ledger import Reason, RowState
from controlplane.meters import MeterSet
from controlplane.ratelimit import RateLimiter

log = structlog.get_logger("sender")

CLOCK_SKEW_MARGIN = 300  # do not send events within 5 minutes of the provider's age limit


class SendStats(msgspec.Struct):
    skipped: str | None = None
    sent: int = 0
    excluded: int = 0
    held: int = 0
    retry: int = 0
    ambiguous: int = 0
    calls: int = 0


class Sender:
    def __init__(
        self,
        storage: Storage,
        billing: Billing,
        meters: MeterSet,
        *,
        batch_size: int = 500,
        concurrency: int = 8,
        ambiguous_after_seconds: int = 23 * 3600,
        claim_seconds: int = 300,
        actor: str = "sender",
        observe: Callable[[Outcome, float], None] | None = None,
    ) -> None:
        self.storage = storage
        self.billing = billing
        self.meters = meters
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.ambiguous_after = ambiguous_after_seconds
        self.actor = actor
        self.claim_seconds = claim_seconds
        self.claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.limiter = RateLimiter(billing.rate_limit)
        self.observe = observe  # each call's outcome and duration (for metrics)

    async def run(
        self,
        flags: Snapshot,
        *,
        clock: Callable[[], float] = time.time,
        org_id: str | None = None,
        until: int | None = None,
        recheck: Callable[[], Awaitable[Snapshot]] | None = None,
    ) -> SendStats:
        """One pass over everything sendable (optionally one org, buckets before `until`).

        `recheck` reads the flags again before each group of calls: a pass stops as soon as
        sending is switched off (a rollback), not at its end. `clock` is read at each read of
        rows, before each group of calls (the attempts' time) and at each settlement (when
        a row was sent): a long pass records when its calls were made, not when it began."""
        stats = SendStats()
        bill_from = flags.bill_from
        if flags.shadow:
            stats.skipped = "shadow is on"
        elif not flags.sending:
            stats.skipped = f"authority is {flags.authority.value}"
        elif bill_from is None:
            stats.skipped = "bill_from is not set"
            log.warning("sender.skipped", reason=stats.skipped)
        try:
            if stats.skipped:  # only the corrections of buckets billed here
                await self._pass(stats, flags, None, clock, org_id, until, None)
            else:
                await self._pass(stats, flags, bill_from, clock, org_id, until, recheck)
        finally:
            await self.storage.release_claims(self.claimant)
        if stats.sent or stats.held or stats.excluded or stats.retry or stats.ambiguous:
            log.info("sender.done", **{k: v for k, v in msgspec.structs.asdict(stats).items() if v})
        return stats

    async def _pass(
        self,
        stats: SendStats,
        flags: Snapshot,
        bill_from: int | None,
        clock: Callable[[], float],
        org_id: str | None,
        until: int | None,
        recheck: Callable[[], Awaitable[Snapshot]] | None,
    ) -> None:
        """One pass from T, or (`bill_from` None) over the buckets billed here only."""

        async def still_sending() -> bool:
            if recheck is None:
                return True
            now = await recheck()
            if now.sending and now.bill_from == bill_from:
                return True
            stop()
            return False

        def stop() -> None:
            stats.skipped = "the flags changed during the pass (sending off, or another T)"
            log.info("sender.stopped", reason=stats.skipped)

        after_id = 0
        blocked: set[Lane] = set()  # lanes with a transient failure: they wait for next pass
        while True:
            at = int(clock())
            claim = Claim(self.claimant, at, at + self.claim_seconds)
            items = await self.storage.sendable(
                after_id,
                self.batch_size,
                org_id,
                until,
                claim=claim,
                billed_only=bill_from is None,
                billed_before=bill_from,
            )
            if not items:
                break
            calls, known = await self._calls(items)
            batch = _Batch(at, clock, calls, versions_of(flags), known)
            decided, deliver = self._triage(items, bill_from, batch)
            exclusions = [s for s in decided if s.state is RowState.EXCLUDED]
            if exclusions:
                # An exclusion re-derives the quantities left in its rounding chain: settle
                # exclusions alone, then read the rows again before deciding anything else.
                await self._settle(exclusions, stats, at)
                continue
            await self._settle(decided, stats, at)
            after_id = items[-1].row.id
            try:
                if deliver and not await self._deliver(
                    deliver, stats, batch, blocked, still_sending
                ):
                    return
            except FlagsChanged:  # seen where the attempts are recorded: nothing was sent
                stop()
                return

    def _triage(
        self,
        items: Sequence[SendItem],
        bill_from: int | None,
        batch: _Batch,
    ) -> tuple[list[Settlement], list[SendItem]]:
        now = batch.at
        decided: list[Settlement] = []
        deliver: list[SendItem] = []
        max_age = self.billing.max_event_age_seconds
        for item in items:
            row = item.row
            call = batch.calls[row.id]
            # A correction for a finalized period goes out stamped into the current one: its
            # age is that timestamp's, not its bucket's.
            timestamp = call.attempt.timestamp if call.attempt else row.bucket_start
            unbillable: tuple[Reason, str | None] | None = None
            if bill_from is not None and row.bucket_start < bill_from and not item.billed:
                unbillable = (Reason.BEFORE_BILL_FROM, None)
            elif max_age is not None and timestamp < now - max_age + CLOCK_SKEW_MARGIN:
                days = max_age // 86400
                unbillable = (Reason.TOO_OLD, f"older than the provider accepts ({days} days)")
            if unbillable and row.attempts:
                # The provider may already have it: "never billed here" would be a guess.
                reason, why = unbillable
                detail = (
                    f"attempted before it became unbillable ({reason.value}"
                    f"{': ' + why if why else ''}); settle by hand"
                )
                decided.append(_decide(item, RowState.HELD, Reason.AMBIGUOUS, detail))
            elif unbillable:
                decided.append(_decide(item, RowState.EXCLUDED, *unbillable))
            elif call.attempt is None:
                decided.append(_decide(item, RowState.HELD, Reason.AMBIGUOUS, call.detail))
            elif item.customer is None:
                if row.state is not RowState.HELD:
                    decided.append(_decide(item, RowState.HELD, Reason.NO_CUSTOMER))
            elif (
                row.attempts
                and row.first_attempt_at is not None
                and row.first_attempt_at < now - self.ambiguous_after
            ):
                decided.append(
                    _decide(
                        item,
                        RowState.HELD,
                        Reason.AMBIGUOUS,
                        f"{row.attempts} attempts since {row.first_attempt_at} without a "
                        "definite answer; the provider may have forgotten the identifier",
                    )
                )
            elif row.quantity == 0:
                decided.append(
                    _decide(
                        item, RowState.SENT, None, "below one unit: nothing to deliver, carried"
                    )
                )
            else:
                deliver.append(item)
        return decided, deliver

    async def _settle(self, decided: list[Settlement], stats: SendStats, at: int) -> None:
        if not decided:
            return
        await self.storage.settle(moves.audited(decided, self.actor), at, self.claimant)
        for s in decided:
            if s.state is RowState.SENT:
                stats.sent += 1
            elif s.state is RowState.EXCLUDED:
                stats.excluded += 1
            elif s.state is RowState.HELD:
                stats.held += 1

    async def _deliver(
        self,
        items: list[SendItem],
        stats: SendStats,
        batch: _Batch,
        blocked: set[Lane],
        still_sending: Callable[[], Awaitable[bool]],
    ) -> bool:
        """Deliver `items` group by group; False when sending was switched off meanwhile."""
        # Small groups: each group's attempts are recorded just before its calls, and its
        # outcomes settled right after, so a crash leaves little to resend. Rows are taken
        # round-robin across lanes, so a group keeps many customers busy even when a backlog
        # arrives org by org.
        group = max(self.concurrency * 4, 32)
        ordered = _interleave(items)
        for start in range(0, len(ordered), group):
            chunk = [i for i in ordered[start : start + group] if _lane(i) not in blocked]
            if not chunk:
                continue
            if not await still_sending():
                return False
            await self._deliver_group(chunk, stats, batch, blocked)
        return True

    async def _deliver_group(
        self, items: list[SendItem], stats: SendStats, batch: _Batch, blocked: set[Lane]
    ) -> None:
        at, calls = batch.at, batch.calls
        # Renew the hold on the rows (a pass can outlive it, e.g. backing off on 429s) and send
        # only rows still held with the quantity read: once a hold lapsed, another sender may
        # have taken a row, or re-derived its rounding chain.
        now = batch.now()
        held = await self.storage.record_attempts(
            [i.row.id for i in items],
            at,
            Claim(self.claimant, now, now + self.claim_seconds),
            flag_versions=batch.flag_versions,
            series={i.row.id: a for i in items if (a := calls[i.row.id].attempt) is not None},
        )
        changed = [i.row.id for i in items if held.get(i.row.id, i.row.quantity) != i.row.quantity]
        if changed:  # read again on the next pass
            await self.storage.release_attempts(changed)
        items = [i for i in items if held.get(i.row.id) == i.row.quantity]
        called: set[int] = set()
        lanes: dict[Lane, list[SendItem]] = defaultdict(list)
        for item in items:
            lanes[_lane(item)].append(item)
        slots = asyncio.Semaphore(self.concurrency)
        results: list[Settlement] = []

        async def lane(queue: list[SendItem]) -> None:
            # one call in flight per (customer, meter), in ledger order
            for item in queue:
                async with slots:
                    await self.limiter.wait()
                    called.add(item.row.id)
                    call = calls[item.row.id]
                    started = time.perf_counter()
                    delivery = await self.billing.send(self._meter_event(item, call.attempt))
                    if self.observe is not None:
                        self.observe(delivery.outcome, time.perf_counter() - started)
                stats.calls += 1
                outcome = delivery.outcome
                if outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE):
                    detail = (
                        "provider already had this identifier"
                        if outcome is Outcome.DUPLICATE
                        else "provider replayed its answer to an earlier call"
                        if delivery.replayed
                        else None
                    )
                    if call.detail is not None:
                        detail = call.detail + (f"; {detail}" if detail else "")
                    # a provider id marks the row accepted by its last call (late_rows reads
                    # it): not when the event arrived with an earlier one
                    arrived_now = outcome is Outcome.ACCEPTED and not delivery.replayed
                    provider_id = delivery.provider_id if arrived_now else None
                    results.append(_decide(item, RowState.SENT, None, detail, provider_id))
                elif outcome is Outcome.REJECTED:
                    results.append(
                        _decide(item, RowState.HELD, Reason.PROVIDER_REJECTED, delivery.message)
                    )
                else:
                    if outcome is Outcome.RETRY:
                        stats.retry += 1
                    else:
                        stats.ambiguous += 1
                    log.warning(
                        "sender.not_delivered",
                        identifier=item.row.identifier,
                        outcome=outcome.value,
                        message=delivery.message,
                    )
                    blocked.add(_lane(item))
                    return  # the rest of this lane waits for the next pass

        await asyncio.gather(*(lane(q) for q in lanes.values()))
        await self._settle(results, stats, batch.now())  # when they were sent, at the latest
        sent_ids = {r.row_id for r in results if r.state is RowState.SENT}
        if sent_ids:
            await self._reissue_late([i for i in items if i.row.id in sent_ids], batch)
        skipped = [i.row.id for i in items if i.row.id not in called]
        if skipped:  # recorded above, never made: they must not count toward `ambiguous`
            await self.storage.release_attempts(skipped)

    def _meter_event(self, item: SendItem, attempt: Attempt | None) -> MeterEvent:
        row = item.row
        meter = self.meters.by_name.get(row.meter)
        if attempt is None:  # triage holds such rows: never here
            raise ValueError(f"{row.identifier}: no call can be made for it")
        return MeterEvent(
            identifier=row.identifier,
            event_name=meter.config.provider_event_name if meter else row.meter,
            customer=attempt.customer,
            value=row.quantity,
            timestamp=attempt.timestamp,
            idempotency_key=attempt.key,
        )

    async def _calls(self, items: Sequence[SendItem]) -> tuple[dict[int, _Call], frozenset[str]]:
        """What each row's call is made with (customer, timestamp, idempotency key), and the
        finalized invoices known when deciding it."""
        periods = await self.storage.closed_periods(sorted({i.row.org_id for i in items}))
        by_org: dict[str, list[ClosedPeriod]] = defaultdict(list)
        for period in periods:
            by_org[period.org_id].append(period)
        calls = {i.row.id: _call(i, by_org.get(i.row.org_id, [])) for i in items}
        return calls, frozenset(p.invoice_id for p in periods)

    async def _reissue_late(self, sent: Sequence[SendItem], batch: _Batch) -> None:
        """An invoice finalized while its rows were in flight (its webhook found them not yet
        sent): re-issue those that reached the provider after it, as the webhook would."""
        periods = await self.storage.closed_periods(sorted({i.row.org_id for i in sent}))
        stamps = {
            (i.row.org_id, attempt.timestamp)
            for i in sent
            if (attempt := batch.calls[i.row.id].attempt) is not None
        }
        for period in periods:
            if period.invoice_id in batch.known_invoices:
                continue
            if any(
                org == period.org_id and period.period_start <= ts < period.period_end
                for org, ts in stamps
            ):
                await reissue_late(
                    self.storage,
                    self.billing,
                    self.meters,
                    period,
                    at=batch.now(),
                    actor=self.actor,
                )


class _Call(msgspec.Struct, frozen=True):
    """A row's next call (None: it cannot be made, `detail` says why), and what the ledger
    says about where it was stamped."""

    attempt: Attempt | None
    detail: str | None = None


def _period_of(periods: Sequence[ClosedPeriod], timestamp: int) -> ClosedPeriod | None:
    return next((p for p in periods if p.period_start <= timestamp < p.period_end), None)


def _call(item: SendItem, closed: Sequence[ClosedPeriod]) -> _Call:
    """The parameters of a row's next call (DESIGN §4, §13).

    A retry repeats its series of attempts: the same customer (even after the org's customer
    changed), timestamp and idempotency key, so the provider answers it as it did the first.
    A row's first call is stamped inside its bucket, or, when the bucket's billing period was
    already finalized, into the current period (the end of the org's newest finalized one).

    When the period a series was stamped into has been finalized since, repeating it would
    land usage where no invoice carries it. If every attempt came before that invoice was
    finalized, a new series stamped into the current period goes out under a key of its own
    and the same identifier: the provider answers "already exists" if an earlier attempt
    arrived (then it is on that invoice), and bills it in the current period if none did.
    An attempt at or after the finalization may have arrived too late for the invoice: the
    row is held as ambiguous, for the provider's own records to settle."""
    row = item.row
    if row.attempt_customer is not None and row.attempt_timestamp is not None:
        series = Attempt(row.attempt_customer, row.attempt_timestamp, row.attempt_key or "")
        period = _period_of(closed, series.timestamp)
        if period is None:
            return _Call(series)
        last = row.last_attempt_at if row.last_attempt_at is not None else row.first_attempt_at
        if last is not None and last < period.finalized_at and item.customer is not None:
            current = max(p.period_end for p in closed)
            return _Call(
                Attempt(item.customer, current, f"{row.identifier}@{current}"),
                f"re-stamped into the current period (timestamp {current}): invoice "
                f"{period.invoice_id} was finalized at {period.finalized_at}, after its "
                f"attempts stamped {series.timestamp}",
            )
        return _Call(
            None,
            f"attempted (last at {last}) with timestamp {series.timestamp} in the period "
            f"of invoice {period.invoice_id}, finalized at {period.finalized_at}: whether it "
            "arrived in time for that invoice is for the provider's records to settle",
        )
    # A first call; or a retry of one attempted before rows kept their call's parameters,
    # which counts only the periods finalized by its first attempt (as that call did).
    done = [
        p for p in closed if row.first_attempt_at is None or p.finalized_at <= row.first_attempt_at
    ]
    customer = item.customer or ""
    period = _period_of(done, row.bucket_start)
    if period is None:
        return _Call(Attempt(customer, row.bucket_start, row.identifier))
    current = max(p.period_end for p in done)
    return _Call(
        Attempt(customer, current, row.identifier),
        f"correction for finalized invoice {period.invoice_id}: stamped into the current "
        f"period (timestamp {current})",
    )


class _Batch(msgspec.Struct, frozen=True):
    """One read of sendable rows: the pass's clock then, and each row's call (computed once
    per read, for triage and for the calls)."""

    at: int
    clock: Callable[[], float]  # the pass's clock (claims are renewed from it)
    calls: dict[int, _Call]
    flag_versions: dict[str, int]  # of the pass's flags: attempts are recorded only under them
    known_invoices: frozenset[str]  # finalized invoices known at the read

    def now(self) -> int:
        """The pass's clock now (claims are renewed from it)."""
        return int(self.clock())


Lane = tuple[str, str]  # (customer, meter): one call in flight at a time


def _lane(item: SendItem) -> Lane:
    return (item.customer or "", item.row.meter)


def _interleave(items: Sequence[SendItem]) -> list[SendItem]:
    """Round-robin over lanes, each lane in ledger order."""
    lanes: dict[Lane, list[SendItem]] = defaultdict(list)
    for item in items:
        lanes[_lane(item)].append(item)
    waves = itertools.zip_longest(*lanes.values())
    return [item for wave in waves for item in wave if item is not None]


def _decide(
    item: SendItem,
    state: RowState,
    reason: str | None,
    detail: str | None = None,
    provider_id: str | None = None,
) -> Settlement:
    return Settlement(
        row_id=item.row.id,
        identifier=item.row.identifier,
        state=state,
        reason=reason,
        detail=detail,
        provider_id=provider_id,
        customer=item.customer,
        quantity=item.row.quantity,
    )
