"""DESIGN §2 invariants under random schedules, checked after every step (hypothesis).

One control plane on a fresh SQLite file per example, driven through its real entry points
(ingest, rollup, send, set_org, set_flags) with an injected clock, over several orgs and both
meters. A schedule is generated as data and replayed; it mixes duplicate and late events (for
buckets already rolled up or sent), plan changes, customers that arrive late, clock jumps,
rollups, sends with random provider answers (accepted, retry, rejected, ambiguous) and flag
flips. The provider double remembers an identifier for 24 h only, like Stripe, and logs every
event it applied, so a resend after it forgot shows up as a double bill.

Checked after every step:
- conservation (§2.1): usage stored == the model of what was ingested (duplicates and rejected
  batches store nothing); per (org, meter, bucket) the ledger holds exactly the stored usage
  unless the bucket is dirty (open), so stored == open + Σ ledger values per (org, meter);
- rounding (§2.3): per (org, meter) and rounding chain (rows billed here; rows excluded, per
  reason) Σ quantities == floor(Σ exact values), and the carries table says the same;
- ledger shape: deterministic identifiers, consecutive revisions, state/reason pairs, only the
  state moves DESIGN §4 allows, values never rewritten, and a quantity re-derived only while
  no part of it can have reached the provider; a second rollup right after one finds nothing;
- no double billing (§2.2): no identifier applied twice by the provider; every applied event is
  a row that is `sent` (or whose applying call answered AMBIGUOUS) with the row's quantity,
  customer, meter and bucket start; every `sent` row of quantity > 0 was applied, quantity-0
  rows never reach the provider;
- sends: no call and no row settled while shadow is on or the legacy biller is the authority;
  nothing before bill_from delivered; each row's new state explained by the flags, the org's
  customer, its age, and the provider's answer in that pass.
And `drain` (every org gets a customer, failures stop, cut over, roll up and send everything,
twice) checks the bill: per (customer, meter) the provider holds exactly the quantities of the
`sent` rows plus those of rows it applied without confirming (held as ambiguous), which is
floor(exact usage of the rows billed here) less the units of rows held back.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st

import controlplane.config
from controlplane.core import ControlPlane
from controlplane.errors import FlagRefused, InvalidInput
from controlplane.flags import FlagChange
from controlplane.interfaces import Delivery, MeterEvent, Outcome
from controlplane.ledger import LedgerRow, Reason, RowState
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.units import MICROS

T = TypeVar("T")

HOUR = 3600
DAY = 24 * HOUR
GRACE = 600
ORGS = ("o1", "o2", "o3")
MAX_AGE = FakeBilling.max_event_age_seconds or 0
CLOCK_SKEW_MARGIN = 300

ALLOWED_REASONS: dict[RowState, set[str | None]] = {
    RowState.PENDING: {None},
    RowState.SENT: {None},
    RowState.HELD: {Reason.NO_CUSTOMER, Reason.PROVIDER_REJECTED, Reason.AMBIGUOUS},
    RowState.EXCLUDED: {Reason.BEFORE_BILL_FROM, Reason.FREE_PLAN, Reason.TOO_OLD},
    RowState.CANCELLED: {Reason.ROLLED_BACK},
}
# DESIGN §4: pending -> sent | held | excluded; held -> pending again (or straight on) when the
# cause is fixed; sent (or attempted) -> cancelled only by a rollback; excluded is final.
ALLOWED_MOVES: dict[RowState, set[RowState]] = {
    RowState.PENDING: {RowState.PENDING, RowState.SENT, RowState.HELD, RowState.EXCLUDED},
    RowState.HELD: {RowState.HELD, RowState.PENDING, RowState.SENT, RowState.EXCLUDED},
    RowState.SENT: {RowState.SENT},
    RowState.EXCLUDED: {RowState.EXCLUDED},
    RowState.CANCELLED: {RowState.CANCELLED},
}
ROLLBACK_MOVES = {RowState.SENT, RowState.PENDING, RowState.HELD}  # may become cancelled


class StripeLikeBilling(FakeBilling):
    """FakeBilling that forgets an identifier 24 h after applying it and logs every call."""

    def __init__(self, clock: list[int]) -> None:
        super().__init__()
        self.clock = clock
        self.log: list[tuple[MeterEvent, Outcome, bool]] = []  # (event, answer, applied?)
        self.applied: list[MeterEvent] = []
        self._applied_at: dict[str, int] = {}

    async def send(self, event: MeterEvent) -> Delivery:
        for ident, at in list(self._applied_at.items()):
            if at < self.clock[0] - DAY:
                self.events.pop(ident, None)
                del self._applied_at[ident]
        had = event.identifier in self.events
        delivery = await super().send(event)
        applied = not had and event.identifier in self.events
        if applied:
            self.applied.append(event)
            self._applied_at[event.identifier] = self.clock[0]
        self.log.append((event, delivery.outcome, applied))
        return delivery


def chain(row: LedgerRow) -> str:
    """The rounding chain of a row: billed here, or excluded (or cancelled) for one reason."""
    unbilled = row.state in (RowState.EXCLUDED, RowState.CANCELLED)
    return str(row.reason) if unbilled else "billable"


def gbs_micros(mb: int, s: int) -> int:
    """`data.mb * data.s / 1024` in micro-units, half-even at the sixth decimal."""
    return round(Fraction(mb * s * MICROS, 1024))


EVENT = st.tuples(
    st.integers(0, 30),  # id number: a small pool, so ids repeat (duplicates)
    st.sampled_from(ORGS),
    st.sampled_from(("tick", "call")),
    st.sampled_from([0, 0, 1, 1, 2, 3, 5, 8, 40 * 24]),  # hours back from this bucket
    st.integers(0, HOUR - 1),  # second inside the bucket
    st.integers(0, 2000),  # mb
    st.integers(0, 5),  # s
)


class Pipeline:
    """A control plane on a fresh SQLite file, its provider double, its clock and a model."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cp-invariants-"))
        self.db = self.dir / "cp.db"
        self.clock = [(int(time.time()) // HOUR + 2) * HOUR]
        self.fake = StripeLikeBilling(self.clock)
        config = controlplane.config.parse(
            {
                "storage": {"backend": "sqlite", "path": str(self.db), "synchronous": "normal"},
                "rollup": {"bucket_seconds": HOUR, "grace_seconds": GRACE},
                "sender": {"batch_size": 7, "concurrency": 3},
                "meters": [
                    {"name": "gbs", "event_type": "tick", "value": "data.mb * data.s / 1024"},
                    {"name": "calls", "event_type": "call", "aggregation": "count"},
                ],
            }
        )
        self.loop = asyncio.new_event_loop()
        self.cp = ControlPlane(config, billing=self.fake, clock=lambda: self.clock[0])
        self.run(self.cp.start())
        # the model
        self.ingested: dict[str, tuple[str, str, int, int]] = {}  # id -> (org, meter, bucket, µ)
        self.customers: dict[str, str] = {}
        self.plans: dict[str, dict[int, str]] = defaultdict(dict)
        self.rows: dict[int, LedgerRow] = {}
        self.ambiguous_applied: set[str] = set()
        # buckets a rollback handed back to the legacy biller (no row of the org's bucket
        # left sent: the legacy biller bills it): never delivered again
        self.handed_back: set[tuple[str, str, int]] = set()
        # buckets the provider has seen a row of before a rollback (a later T lies after them)
        self.seen: set[int] = set()
        # (org, meter) with rows a rollback could not cancel: both billers have them, the
        # rollback listed them for credit notes, so their billable chain no longer adds up
        self.listed: set[tuple[str, str]] = set()

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)

    def close(self) -> None:
        try:
            self.run(self.cp.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # helpers ----------------------------------------------------------------------------------

    @property
    def bucket_now(self) -> int:
        return self.clock[0] // HOUR * HOUR

    def plan_at(self, org: str, when: int) -> str:
        current = "free"
        for effective_from, plan in sorted(self.plans.get(org, {}).items()):
            if effective_from <= when:
                current = plan
        return current

    def ledger(self) -> list[LedgerRow]:
        return self.run(self.cp.storage.ledger(limit=1_000_000))

    def query(self, sql: str) -> list[Any]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql).fetchall()

    def settle_snapshot(
        self,
        expect_unchanged: bool,
        rollback: bool = False,
        except_buckets: set[tuple[str, int]] | None = None,
    ) -> dict[int, LedgerRow]:
        """Check the rows against the previous step and remember them (`except_buckets`:
        (org, bucket) pairs whose rows may change all the same)."""
        now = {r.id: r for r in self.ledger()}
        for row_id, before in self.rows.items():
            after = now.get(row_id)
            assert after is not None, f"ledger row {before.identifier} disappeared"
            for field in (
                "identifier",
                "org_id",
                "meter",
                "bucket_start",
                "revision",
                "value_micros",
            ):
                assert getattr(after, field) == getattr(before, field), (field, before, after)
            # a quantity may be re-derived only while nothing of it can have left: the row was
            # never attempted, or it is now excluded (never billed here)
            undelivered = before.state in (RowState.PENDING, RowState.HELD) and not before.attempts
            if not (undelivered or after.state is RowState.EXCLUDED):
                assert after.quantity == before.quantity, (before, after)
            cancelled = (
                rollback
                and before.state in ROLLBACK_MOVES
                and after.state is RowState.CANCELLED
                and (before.state is RowState.SENT or before.attempts > 0)
            )
            assert cancelled or after.state in ALLOWED_MOVES[before.state], (before, after)
            excepted = (before.org_id, before.bucket_start) in (except_buckets or set())
            if expect_unchanged and not cancelled and not excepted:
                assert (after.state, after.reason, after.attempts) == (
                    before.state,
                    before.reason,
                    before.attempts,
                ), f"{after.identifier} changed outside a send: {before} -> {after}"
        previous, self.rows = self.rows, now
        return previous

    # rules ----------------------------------------------------------------------------------

    def start(self, orgs: list[tuple[str | None, bool]], cutover: int | None) -> None:
        for org, (plan, customer) in zip(ORGS, orgs, strict=True):
            if plan is not None or customer:
                self.set_org(org, customer, plan, None, False)
        if cutover is not None:
            self.cutover(cutover)

    def cutover(self, bill_from: int) -> None:
        """What `cutover execute` does: all three flags in one change."""
        self.set_flags(False, "controlplane", bill_from)

    def rollback(self, cancel_sent: bool) -> None:
        """`controlplane cutover rollback [--cancel-sent]`."""
        result = self.run(
            self.cp.cutover.rollback(actor="prop", reason="rollback", cancel_sent=cancel_sent)
        )
        self.settle_snapshot(expect_unchanged=True, rollback=True)
        flags = self.run(self.cp.flags())
        assert (flags.authority.value, flags.shadow) == ("legacy", True)
        kept = {
            (r.org_id, r.bucket_start)
            for r in self.rows.values()
            if r.state is RowState.SENT and r.offsets_id is None
        }
        for r in self.rows.values():
            if r.state is RowState.SENT or r.state is RowState.CANCELLED or r.attempts:
                self.seen.add(r.bucket_start)
                if (r.org_id, r.bucket_start) not in kept:  # a kept bucket stays billed here
                    self.handed_back.add((r.org_id, r.meter, r.bucket_start))
        # Rows that may have reached the provider and stay (listed for credit notes, or
        # refused by it) keep their quantities after others left: their chain is settled by
        # hand, and only promises it never goes negative.
        cancelled = {
            (r.org_id, r.meter) for r in self.rows.values() if r.state is RowState.CANCELLED
        }
        for r in self.rows.values():
            stays = r.state not in (RowState.CANCELLED, RowState.EXCLUDED)
            seen = r.attempts or r.state is RowState.SENT
            if stays and seen and ((r.org_id, r.meter) in cancelled or not cancel_sent):
                self.listed.add((r.org_id, r.meter))
        for note in result.not_cancelled:
            self.listed.add((note.org_id, note.meter))

    def ingest(self, batch: list[tuple[int, str, str, int, int, int, int]]) -> None:
        items = []
        accepted = duplicates = 0
        seen: set[str] = set()
        for n, org, kind, back, second, mb, s in batch:
            bucket = self.bucket_now - back * HOUR
            ident = f"e{n}"
            event: dict[str, Any] = {
                "id": ident,
                "type": kind,
                "subject": org,
                "ts": (bucket + second) * 1000,
            }
            if kind == "tick":
                event["data"] = {"mb": mb, "s": s}
            items.append(event)
            if ident in self.ingested or ident in seen:
                duplicates += 1
                continue
            seen.add(ident)
            accepted += 1
            meter, micros = ("gbs", gbs_micros(mb, s)) if kind == "tick" else ("calls", MICROS)
            self.ingested[ident] = (org, meter, bucket, micros)
        result = self.run(self.cp.ingest(items, "http"))
        assert (result.accepted, result.duplicates) == (accepted, duplicates)
        self.settle_snapshot(expect_unchanged=True)

    def ingest_bad_batch(self, n: int, org: str) -> None:
        good = {
            "id": f"e{n}",
            "type": "tick",
            "subject": org,
            "ts": self.clock[0] * 1000,
            "data": {"mb": 1024, "s": 1},
        }
        bad = {
            "id": f"e{n + 1}",
            "type": "tick",
            "subject": org,
            "ts": self.clock[0] * 1000,
            "data": {"mb": 1024},
        }
        with pytest.raises(InvalidInput):
            self.run(self.cp.ingest([good, bad], "http"))
        self.settle_snapshot(expect_unchanged=True)  # and the usage check: nothing stored

    def advance(self, seconds: int) -> None:
        self.clock[0] += seconds

    def rollup(self, until: int | None) -> None:
        closed_before = self.clock[0] - GRACE if until is None else self.bucket_now + until * HOUR
        self.run(self.cp.rollup(until=None if until is None else closed_before))
        previous = self.settle_snapshot(expect_unchanged=True)
        again = self.run(self.cp.rollup(until=None if until is None else closed_before))
        assert (again.buckets, again.rows) == (0, 0), "a second rollup found work"
        for row in self.rows.values():
            if row.id in previous:
                continue
            assert row.bucket_end <= closed_before, f"open bucket rolled up: {row}"
            free = self.plan_at(row.org_id, row.bucket_start) != "pro"
            expected = (RowState.EXCLUDED, Reason.FREE_PLAN) if free else (RowState.PENDING, None)
            assert (row.state, row.reason) == expected, row
        left = self.query(
            f"SELECT count(*) FROM dirty_buckets WHERE bucket_start + {HOUR} <= {closed_before}"
        )
        assert left == [(0,)], "a closed dirty bucket was left behind"

    def scheduler(self, seconds: int, answers: list[Outcome], reject: str | None) -> None:
        """A scheduler tick: time passes, then the rollup job, then the sender job."""
        self.advance(seconds)
        self.rollup(None)
        self.check()
        self.send(answers, reject)

    def set_org(
        self,
        org: str,
        customer: bool,
        plan: str | None,
        effective: int | None,
        half: bool,
        force: bool = False,
    ) -> None:
        if not customer and plan is None:
            with pytest.raises(InvalidInput):
                self.run(self.cp.set_org(org, customer=None, plan=None, actor="prop"))
            return
        effective_from = (
            0 if effective is None else self.bucket_now + effective * HOUR + (1800 if half else 0)
        )
        before = self.run(self.cp.storage.get_org(org))
        try:
            self.run(
                self.cp.set_org(
                    org,
                    customer=f"cus_{org}" if customer else None,
                    plan=plan,
                    actor="prop",
                    effective_from=effective_from,
                    force=force,
                )
            )
        except InvalidInput as exc:
            # a plan period over buckets already rolled up under another plan, unforced
            assert not force and [p.field for p in exc.problems] == ["effective_from"], exc
            assert self.run(self.cp.storage.get_org(org)) == before, "a refused change changed"
            return
        if customer:
            self.customers[org] = f"cus_{org}"
        if plan is not None:
            self.plans[org][effective_from] = plan
        self.settle_snapshot(expect_unchanged=True)

    def set_flags(self, shadow: bool | None, authority: str | None, bill_from: Any) -> None:
        changes = []
        if shadow is not None:
            changes.append(FlagChange("shadow", shadow))
        if authority is not None:
            changes.append(FlagChange("authority", authority))
        if bill_from != "keep":
            value = None if bill_from is None else self.bucket_now - bill_from * HOUR
            changes.append(FlagChange("bill_from", value))
        if not changes:
            return
        before = self.run(self.cp.flags())
        try:
            self.run(self.cp.set_flags(changes, actor="prop", reason="property test"))
        except FlagRefused:
            after = self.run(self.cp.flags())
            assert after.values == before.values, "a refused flip changed a flag"
        self.settle_snapshot(expect_unchanged=True)

    def send(self, answers: list[Outcome], reject: str | None) -> None:
        script = list(answers)
        rejected = f"cus_{reject}" if reject else None

        def decide(event: MeterEvent) -> Outcome | None:
            if event.customer == rejected:
                return Outcome.REJECTED
            return script.pop(0) if script else None

        self.fake.decide = decide
        try:
            self.check_send(lambda: self.run(self.cp.send()))
        finally:
            self.fake.decide = None

    def check_send(self, send: Any) -> None:
        flags = self.run(self.cp.flags())
        calls_before = len(self.fake.log)
        send()
        calls = self.fake.log[calls_before:]
        sending = flags.sending and flags.bill_from is not None
        # a bucket with a sent row is billed here whole, whatever the flags say: the legacy
        # biller skips it, so its corrections are sent while nothing else is
        billed = {
            (r.org_id, r.bucket_start)
            for r in self.rows.values()
            if r.state is RowState.SENT and r.offsets_id is None
        }
        previous = self.settle_snapshot(expect_unchanged=not sending, except_buckets=billed)
        bill_from = flags.bill_from if sending else None
        now = self.clock[0]
        by_ident = {r.identifier: r for r in self.rows.values()}
        answers: dict[str, list[Outcome]] = defaultdict(list)
        for event, outcome, applied in calls:
            row = by_ident[event.identifier]
            called_row = previous[row.id]
            assert called_row.state is RowState.PENDING or (
                called_row.state is RowState.HELD and called_row.reason == Reason.NO_CUSTOMER
            ), f"called for a {called_row.state}/{called_row.reason} row {row.identifier}"
            if bill_from is None or row.bucket_start < bill_from:
                assert (row.org_id, row.bucket_start) in billed, (
                    f"delivered while shadow or legacy, or before bill_from: {row}"
                )
            assert (row.org_id, row.meter, row.bucket_start) not in self.handed_back, (
                f"delivered a bucket a rollback handed back to the legacy biller: {row}"
            )
            assert row.bucket_start >= now - MAX_AGE, f"delivered too old a bucket: {row}"
            # a retry goes to the customer its idempotency key was first used with
            assert event == MeterEvent(
                identifier=row.identifier,
                event_name=row.meter,
                customer=called_row.attempt_customer or self.customers[row.org_id],
                value=row.quantity,
                timestamp=row.bucket_start,
                idempotency_key=row.identifier,
            )
            assert event.value != 0, "a quantity-0 row reached the provider"
            answers[row.identifier].append(outcome)
            if applied and outcome is Outcome.AMBIGUOUS:
                self.ambiguous_applied.add(row.identifier)
        for row in self.rows.values():
            before = previous.get(row.id)
            assert before is not None, f"a send wrote a ledger row: {row}"
            if (before.state, before.reason) == (row.state, row.reason):
                if row.identifier in answers:
                    assert answers[row.identifier][-1] in (Outcome.RETRY, Outcome.AMBIGUOUS)
                continue
            got = answers.get(row.identifier, [])
            move = (row.state, row.reason)
            why = f"{before.state}/{before.reason} -> {move}: {row}, provider answered {got}"
            kept = (row.org_id, row.bucket_start) in billed
            if move == (RowState.EXCLUDED, Reason.BEFORE_BILL_FROM):
                assert bill_from is not None and row.bucket_start < bill_from, why
                assert not kept and not got, why
            elif move == (RowState.EXCLUDED, Reason.TOO_OLD):
                assert row.bucket_start < now - MAX_AGE + CLOCK_SKEW_MARGIN and not got, why
            elif move == (RowState.HELD, Reason.NO_CUSTOMER):
                assert row.org_id not in self.customers and not got, why
            elif move == (RowState.HELD, Reason.AMBIGUOUS):
                assert row.attempts > 0 and not got, why
            elif move == (RowState.HELD, Reason.PROVIDER_REJECTED):
                assert got and got[-1] is Outcome.REJECTED, why
            elif move == (RowState.SENT, None):
                assert kept or (bill_from is not None and row.bucket_start >= bill_from), why
                if row.quantity == 0:
                    assert not got, why
                else:
                    assert got and got[-1] in (Outcome.ACCEPTED, Outcome.DUPLICATE), why
            else:
                raise AssertionError(f"unexpected move {why}")

    def drain(self) -> None:
        """Every org gets a customer, failures stop, cut over, roll up and send everything."""
        for org in ORGS:
            self.run(self.cp.set_org(org, customer=f"cus_{org}", plan=None, actor="prop"))
            self.customers[org] = f"cus_{org}"
        self.settle_snapshot(expect_unchanged=True)
        flags = self.run(self.cp.flags())
        bill_from = flags.bill_from if flags.bill_from is not None else self.bucket_now - 8 * HOUR
        if self.seen:  # a cutover after a rollback starts after what the provider saw
            bill_from = max(bill_from, max(self.seen) + HOUR)
        self.run(
            self.cp.set_flags(
                [
                    FlagChange("authority", "controlplane"),
                    FlagChange("bill_from", bill_from),
                    FlagChange("shadow", False),
                ],
                actor="prop",
                reason="drain",
                force=True,
            )
        )
        self.run(self.cp.rollup(until=self.bucket_now + HOUR))
        self.settle_snapshot(expect_unchanged=True)
        assert self.query("SELECT count(*) FROM dirty_buckets") == [(0,)]
        self.check_send(lambda: self.run(self.cp.send()))
        left = Counter((r.state, r.reason) for r in self.rows.values())
        assert left[(RowState.PENDING, None)] == 0, left
        assert left[(RowState.HELD, Reason.NO_CUSTOMER)] == 0, left
        calls = len(self.fake.log)
        self.check_send(lambda: self.run(self.cp.send()))
        assert len(self.fake.log) == calls, "a second pass found more to send"

        applied = {e.identifier for e in self.fake.applied}
        for org in ORGS:
            for meter in ("gbs", "calls"):
                if (org, meter) in self.listed:
                    continue  # both billers have some of it: settled by credit notes
                rows = [
                    r
                    for r in self.rows.values()
                    if (r.org_id, r.meter) == (org, meter) and r.state is not RowState.CANCELLED
                ]
                quantity: Counter[str] = Counter()
                for r in rows:
                    held_applied = r.state is RowState.HELD and r.identifier in applied
                    quantity["applied-held" if held_applied else r.state.value] += r.quantity
                billable = sum(r.value_micros for r in rows if r.state is not RowState.EXCLUDED)
                got = sum(
                    e.value
                    for e in self.fake.applied
                    if (e.customer, e.event_name) == (f"cus_{org}", meter)
                    and e.identifier not in self.fake.cancelled
                )
                # the customer is billed exactly what the ledger says was sent, plus rows the
                # provider applied without ever confirming (held as ambiguous) ...
                assert got == quantity["sent"] + quantity["applied-held"], (org, meter, quantity)
                # ... which is floor(usage billed here) less what is held back
                assert got == billable // MICROS - quantity["held"], (org, meter, quantity)

    # invariants -----------------------------------------------------------------------------

    def check(self) -> None:
        rows = self.ledger()
        self.usage_is_conserved(rows)
        self.rounding_carry_holds(rows)
        self.ledger_rows_are_well_formed(rows)
        self.nothing_is_billed_twice(rows)

    def usage_is_conserved(self, rows: list[LedgerRow]) -> None:
        expected: Counter[tuple[str, str, int]] = Counter()
        for org, meter, bucket, micros in self.ingested.values():
            expected[(org, meter, bucket)] += micros
        stored = {
            (o, m, b): v
            for o, m, b, v in self.query(
                "SELECT org_id, meter, bucket_start, sum(micros) FROM meter_values GROUP BY 1, 2, 3"
            )
        }
        assert stored == dict(expected), "stored usage differs from what was ingested"
        assert self.query("SELECT count(*) FROM usage_events") == [(len(self.ingested),)]

        dirty = set(self.query("SELECT org_id, bucket_start FROM dirty_buckets"))
        ledger: Counter[tuple[str, str, int]] = Counter()
        for r in rows:
            ledger[(r.org_id, r.meter, r.bucket_start)] += r.value_micros
        open_usage: Counter[tuple[str, str]] = Counter()
        for key in stored.keys() | ledger.keys():
            org, meter, bucket = key
            if (org, bucket) in dirty:
                open_usage[(org, meter)] += stored.get(key, 0) - ledger[key]
            else:
                assert stored.get(key, 0) == ledger[key], f"closed bucket {key} not in ledger"
        totals: Counter[tuple[str, str]] = Counter()
        folded: Counter[tuple[str, str]] = Counter()
        for (org, meter, _b), v in stored.items():
            totals[(org, meter)] += v
        for (org, meter, _b), v in ledger.items():
            folded[(org, meter)] += v
        for pair in totals.keys() | folded.keys():
            assert totals[pair] == open_usage[pair] + folded[pair], pair

    def rounding_carry_holds(self, rows: list[LedgerRow]) -> None:
        """Per (org, meter, chain): Σ quantities == floor(Σ exact), and the carries agree.

        Rows billed here and rows excluded by rule (per reason) are separate chains: a unit of
        usage must not move between what is billed and what is not (DESIGN §2.3)."""
        chains: dict[tuple[str, str, str], tuple[int, int]] = {}
        for r in rows:
            assert r.value_micros > 0 and r.quantity >= 0, r
            key = (r.org_id, r.meter, chain(r))
            exact, whole = chains.get(key, (0, 0))
            chains[key] = (exact + r.value_micros, whole + r.quantity)
        for key, (exact, whole) in chains.items():
            if key[2] != "billable" or key[:2] in self.listed:
                continue  # handed back (or listed for credit notes): left as they were
            assert whole == exact // MICROS, (
                f"rounding chain {key}: {whole} units for {exact} micro-units; rows "
                + str(
                    [
                        (r.identifier, r.value_micros, r.quantity, r.state.value, r.reason)
                        for r in rows
                        if (r.org_id, r.meter, chain(r)) == key
                    ]
                )
            )
        # A carry keeps the usage not yet on the ledger in whole units (never lifetime sums).
        carries = {
            (o, m, seg): e + q * MICROS
            for o, m, seg, e, q in self.query(
                "SELECT org_id, meter, segment, exact_micros, quantity FROM carries"
            )
            if (e, q) != (0, 0)
        }
        expected = {k: exact - whole * MICROS for k, (exact, whole) in chains.items()}
        assert carries == {k: v for k, v in expected.items() if v}, (
            "the carries table disagrees with the ledger"
        )

    def ledger_rows_are_well_formed(self, rows: list[LedgerRow]) -> None:
        revisions: dict[tuple[str, str, int], list[int]] = defaultdict(list)
        for r in rows:
            assert r.identifier == f"{r.org_id}:{r.meter}:{r.bucket_start}:{r.revision}"
            assert r.bucket_start % HOUR == 0 and r.bucket_end == r.bucket_start + HOUR
            assert r.reason in ALLOWED_REASONS[r.state], r
            if r.state is not RowState.CANCELLED:  # a cancelled row keeps when it was sent
                assert (r.sent_at is not None) == (r.state is RowState.SENT), r
            revisions[(r.org_id, r.meter, r.bucket_start)].append(r.revision)
        for key, revs in revisions.items():
            assert revs == list(range(1, len(revs) + 1)), (key, revs)

    def nothing_is_billed_twice(self, rows: list[LedgerRow]) -> None:
        applied = [e.identifier for e in self.fake.applied]
        assert len(applied) == len(set(applied)), "an identifier was applied twice"
        by_ident = {r.identifier: r for r in rows}
        for event in self.fake.applied:
            row = by_ident[event.identifier]
            if row.state is RowState.CANCELLED:
                assert event.identifier in self.fake.cancelled, f"cancelled only here: {row}"
                continue
            assert row.state is RowState.SENT or (
                event.identifier in self.ambiguous_applied
                and row.state in (RowState.PENDING, RowState.HELD)
            ), f"provider has {row.identifier} but the ledger says {row.state}/{row.reason}"
            assert (event.value, event.timestamp) == (row.quantity, row.bucket_start), (
                f"provider has {event}, the ledger {row}"
            )
        applied_set = set(applied)
        called = {e.identifier for e, _o, _a in self.fake.log}
        for r in rows:
            if r.state is RowState.SENT and r.quantity:
                assert r.identifier in applied_set, f"sent but never delivered: {r}"
            if r.state is RowState.CANCELLED and r.quantity and r.identifier in applied_set:
                assert r.identifier in self.fake.cancelled, f"cancelled only here: {r}"
            if r.quantity == 0:
                assert r.identifier not in called


ORG = st.sampled_from(ORGS)
# the provider's answers to the calls of one send pass, in order (then: accepted)
ANSWERS = st.lists(
    st.sampled_from([Outcome.ACCEPTED, Outcome.RETRY, Outcome.REJECTED, Outcome.AMBIGUOUS]),
    max_size=8,
)
BILL_FROM = st.sampled_from([0, 1, 2, 4, 8, 24, 48, 41 * 24])  # hours back from this bucket
REJECT = st.one_of(st.none(), st.none(), ORG)  # a customer the provider refuses in that pass


def step(name: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    """A schedule step: the Pipeline method to call and its arguments."""
    return st.tuples(st.just(name), *args)


STEPS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "ingest": step("ingest", st.lists(EVENT, min_size=1, max_size=6)),
    "ingest_bad_batch": step("ingest_bad_batch", st.integers(100, 130), ORG),
    "advance": step(
        "advance", st.sampled_from([60, GRACE, 1800, HOUR, 3 * HOUR, 13 * HOUR, 25 * HOUR])
    ),
    "rollup": step("rollup", st.one_of(st.none(), st.integers(-2, 1))),
    "send": step("send", ANSWERS, REJECT),
    "scheduler": step(
        "scheduler",
        st.sampled_from([GRACE, 1800, HOUR, 2 * HOUR, 6 * HOUR, 25 * HOUR]),
        ANSWERS,
        REJECT,
    ),
    "set_org": step(
        "set_org",
        ORG,
        st.booleans(),
        st.sampled_from([None, "pro", "pro", "free"]),
        st.one_of(st.none(), st.integers(-6, 2)),
        st.booleans(),
        st.booleans(),  # forced
    ),
    "set_flags": step(
        "set_flags",
        st.sampled_from([None, False, False, True]),
        st.sampled_from([None, "legacy", "controlplane", "edge", "cell"]),
        st.one_of(st.just("keep"), st.none(), BILL_FROM),
    ),
    "cutover": step("cutover", BILL_FROM),
    "rollback": step("rollback", st.booleans()),
    "drain": step("drain"),
}


def schedule_of(weights: dict[str, int]) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    steps = [STEPS[name] for name, weight in weights.items() for _ in range(weight)]
    return st.lists(st.one_of(steps), min_size=10, max_size=30)


SETUP = st.tuples(
    st.lists(
        st.tuples(
            st.sampled_from(["pro", "pro", "pro", "free", None]),
            st.sampled_from([True, True, False]),
        ),
        min_size=len(ORGS),
        max_size=len(ORGS),
    ),
    st.one_of(st.none(), BILL_FROM, BILL_FROM),  # cut over at the start
)


def replay(pipeline: Pipeline, schedule: list[tuple[Any, ...]]) -> None:
    """Run every step, check every invariant after each, then drain and check the bill."""
    pipeline.check()
    for name, *args in schedule:
        getattr(pipeline, name)(*args)
        pipeline.check()
    pipeline.drain()
    pipeline.check()
    # what was exercised, for `pytest --hypothesis-show-statistics`
    for state, reason in {(r.state.value, r.reason) for r in pipeline.rows.values()}:
        note_event(f"row ended {state}/{reason}")
    for outcome in {o.value for _e, o, _a in pipeline.fake.log}:
        note_event(f"provider answered {outcome}")


PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY_SETTINGS
@given(
    setup=SETUP,
    schedule=schedule_of(
        {
            "ingest": 5,
            "scheduler": 4,
            "advance": 2,
            "rollup": 2,
            "send": 2,
            "set_org": 2,
            "set_flags": 2,
            "cutover": 1,
            "rollback": 1,
            "ingest_bad_batch": 1,
            "drain": 1,
        }
    ),
)
def test_invariants_hold_after_every_step(
    setup: tuple[list[tuple[str | None, bool]], int | None], schedule: list[tuple[Any, ...]]
) -> None:
    """Everything mixed: plans, customers and flags change while usage flows."""
    pipeline = Pipeline()
    try:
        pipeline.start(*setup)
        replay(pipeline, schedule)
    finally:
        pipeline.close()


@PROPERTY_SETTINGS
@given(
    customers=st.lists(st.booleans(), min_size=len(ORGS), max_size=len(ORGS)),
    bill_from=BILL_FROM,
    schedule=schedule_of(
        {"ingest": 3, "scheduler": 4, "send": 2, "advance": 1, "set_org": 1, "cutover": 1}
    ),
)
def test_delivery_is_exactly_once_under_provider_failures(
    customers: list[bool], bill_from: int, schedule: list[tuple[Any, ...]]
) -> None:
    """Cut over from the start and every org pro, so most sends reach the provider, which
    retries, refuses, loses answers and forgets identifiers after 24 h."""
    pipeline = Pipeline()
    try:
        pipeline.start([("pro", c) for c in customers], bill_from)
        replay(pipeline, schedule)
    finally:
        pipeline.close()


@PROPERTY_SETTINGS
@given(
    customers=st.lists(st.booleans(), min_size=len(ORGS), max_size=len(ORGS)),
    bill_from=BILL_FROM,
    schedule=schedule_of(
        {
            "ingest": 3,
            "scheduler": 3,
            "send": 1,
            "advance": 1,
            "set_flags": 3,
            "cutover": 2,
            "rollback": 2,
        }
    ),
)
def test_cutovers_and_rollbacks_never_bill_a_bucket_twice(
    customers: list[bool], bill_from: int, schedule: list[tuple[Any, ...]]
) -> None:
    """Live from the start, then any order of unforced flag changes, cutovers and rollbacks
    (with and without cancelling at the provider) while usage flows: a bucket a rollback
    handed back is never delivered again, and the books add up after every step."""
    pipeline = Pipeline()
    try:
        pipeline.start([("pro", c) for c in customers], bill_from)
        replay(pipeline, schedule)
    finally:
        pipeline.close()
