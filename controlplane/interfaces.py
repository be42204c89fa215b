"""Every plugin contract, in one file.

Plugins are chosen by name in the config (``backend = "sqlite"``) and resolved through
:mod:`controlplane.registry`. Each kind has an abstract base class here; a class that misses a
method fails when it is instantiated, not in production. All plugins share one lifecycle:
``await start()`` once before use, ``await close()`` once at shutdown.

Kinds: :class:`Storage`, :class:`IngestSource`, :class:`Billing`, :class:`LegacySource`.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, ClassVar

import msgspec

from controlplane.errors import ControlPlaneError
from controlplane.ledger import LedgerRow, NewRow, RowState

# ---------------------------------------------------------------------------------------------
# Shared records


class PluginConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every plugin's config section; the `backend` key names the plugin."""


class StoredEvent(msgspec.Struct, frozen=True, array_like=True):
    """A validated usage event, with the meter values it carries, ready to store."""

    source: str
    event_id: str
    type: str
    org_id: str
    time_ms: int
    data: bytes  # the event's `data` object as JSON
    values: tuple[tuple[str, int], ...]  # (meter, micro-units) for each meter it feeds


class IngestResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """A stored batch: events accepted, duplicates of stored ones, and how many no meter
    reads (`unmetered`, stored but never billed: its first types in `unmetered_types`)."""

    accepted: int
    duplicates: int
    unmetered: int = 0
    unmetered_types: dict[str, int] = {}


class UsageTotal(msgspec.Struct, frozen=True):
    org_id: str
    meter: str
    bucket_start: int
    value_micros: int


class PlanPeriod(msgspec.Struct, frozen=True):
    plan: str
    effective_from: int


class Org(msgspec.Struct, frozen=True):
    org_id: str
    customer: str | None
    plans: list[PlanPeriod]  # oldest first
    updated_at: int
    subscription: str | None = None  # the provider subscription provisioned for it
    subscription_status: str | None = None  # "active" | "canceled"

    def plan_at(self, when: int) -> str | None:
        """The plan in force at `when`, or None when no stored plan covers it."""
        current: str | None = None
        for period in self.plans:
            if period.effective_from <= when:
                current = period.plan
        return current


class Carry(msgspec.Struct, frozen=True):
    """Per (org, meter, segment): exact usage and whole units written to the ledger so far.

    Segments (see :func:`controlplane.ledger.segment`) keep billed and excluded usage apart."""

    org_id: str
    meter: str
    segment: str
    exact_micros: int
    quantity: int


class RollupBatch(msgspec.Struct, frozen=True):
    """What one rollup step reads, inside its transaction."""

    totals: list[UsageTotal]  # from events
    ledger_sums: list[UsageTotal]  # sum of ledger revisions written so far
    revisions: dict[tuple[str, str, int], int]  # (org, meter, bucket) -> highest revision
    carries: list[Carry]
    orgs: dict[str, Org]


class HeldBucket(msgspec.Struct, frozen=True):
    """A closed (org, bucket) the rollup cannot fold: it stays out of the ledger, and out of
    the rollup's way, until an event for it arrives (ingest marks it dirty again)."""

    org_id: str
    bucket_start: int
    reason: str


class RollupPlan(msgspec.Struct, frozen=True):
    """What one rollup step writes, in the same transaction."""

    rows: list[NewRow]
    carries: list[Carry]
    held: list[HeldBucket] = []


RollupPlanner = Callable[[RollupBatch], RollupPlan]


class ChainRow(msgspec.Struct, frozen=True, array_like=True):
    """One ledger row of a rounding chain, as re-quantification sees it."""

    id: int
    value_micros: int
    quantity: int
    frozen: bool  # attempted, sent or held by another sender: its quantity can no longer change


class Claim(msgspec.Struct, frozen=True):
    """A sender's hold on the rows it reads: who, when, and until when it lasts."""

    claimant: str
    at: int
    until: int


class Attempt(msgspec.Struct, frozen=True, array_like=True):
    """What one delivery call of a ledger row is made with; a retry repeats all of it."""

    customer: str
    timestamp: int
    key: str  # the idempotency key


class SendItem(msgspec.Struct, frozen=True):
    """A ledger row the sender may deliver, with the org's provider customer at read time."""

    row: LedgerRow
    customer: str | None


class Settlement(msgspec.Struct, frozen=True):
    """The sender's decision for one row."""

    row_id: int
    identifier: str
    state: RowState
    reason: str | None = None
    detail: str | None = None
    provider_id: str | None = None
    customer: str | None = None
    quantity: int = 0


class SeamRows(msgspec.Struct, frozen=True):
    reached: int  # sent, attempted or cancelled: the provider has (or had) them
    excluded_before_bill_from: int


SeamReader = Callable[[int], Awaitable[SeamRows]]
"""What the ledger holds from a bucket start on (see :meth:`Storage.seam`)."""

FlagGuard = Callable[[SeamReader], Awaitable[None]]
"""The seam rules of a flag change; raises FlagRefused to write nothing."""


class FlagsChanged(ControlPlaneError):
    """The flags changed since the caller read them: the seam may have moved."""


class StaticFlags(msgspec.Struct, frozen=True):
    """The config file and environment layers' flag values: as last recorded, and now."""

    before: dict[str, Any] | None  # None: never recorded
    after: dict[str, Any]


class RuntimeFlag(msgspec.Struct, frozen=True):
    name: str
    value: Any  # JSON value
    version: int
    updated_at: int


class FlagWrite(msgspec.Struct, frozen=True):
    name: str
    value: Any
    expected_version: int  # 0 when the flag has no runtime value yet


class AuditEntry(msgspec.Struct, frozen=True):
    """One append-only audit record of a money-moving change."""

    action: str  # e.g. "flag.set", "ledger.sent", "org.set"
    subject: str
    actor: str
    reason: str | None = None
    before: Any = None
    after: Any = None
    forced: bool = False
    group_id: str | None = None


class AuditRecord(msgspec.Struct, frozen=True):
    id: int
    at: int
    action: str
    subject: str
    actor: str
    reason: str | None
    before: Any
    after: Any
    forced: bool
    group_id: str | None
    prev_hash: str
    hash: str
    signature: str | None = None  # "<algorithm>:<hex>" when the chain is signed


class JobRun(msgspec.Struct, frozen=True):
    job: str
    started_at: float
    ended_at: float
    outcome: str  # "ok" | "error" | "skipped"
    counts: dict[str, int] = {}
    error: str | None = None


class LedgerCount(msgspec.Struct, frozen=True, array_like=True):
    """How many ledger rows are in one (state, reason)."""

    state: str
    reason: str | None
    rows: int


class DirtyBacklog(msgspec.Struct, frozen=True):
    """Closed buckets still waiting for the rollup."""

    buckets: int
    oldest_start: int | None  # None when there are none
    held: int = 0  # closed buckets the rollup holds (it cannot fold them), not counted above


class MigrationStatus(msgspec.Struct, frozen=True):
    applied: list[str]
    pending: list[str]

    @property
    def current(self) -> bool:
        return not self.pending


class OrgDrift(msgspec.Struct, frozen=True):
    """One org's usage on both sides of a parity comparison, in micro-units.

    None means the org is absent on that side (which is itself a mismatch)."""

    org_id: str
    controlplane_micros: int | None
    legacy_micros: int | None


class ParityRun(msgspec.Struct, frozen=True):
    """The scheduled checker's comparison of one settled bucket, as stored."""

    meter: str
    bucket_start: int
    bucket_end: int
    checked_at: int
    orgs: int  # in the union of both sides
    mismatches: int  # orgs outside tolerance or on one side only
    material: int  # orgs whose drift is material by the alert policy
    controlplane_micros: int
    legacy_micros: int
    worst_org: str | None
    worst_drift_micros: int  # that org's absolute drift
    worst_relative: str | None  # its relative drift as a decimal string; None: not finite
    clean: bool  # no mismatches
    alarming: bool  # material drift on enough orgs, or on the total
    alarm_since: int | None  # first bucket of the unbroken alarming streak this run is in
    id: int = 0


class ParityAlert(msgspec.Struct, frozen=True):
    """An alert raised by the checker: delivered, waiting to be, or suppressed."""

    meter: str
    bucket_start: int  # the bucket whose check raised it
    dedup_key: str
    text: str
    state: str  # "pending" | "sent" | "logged" | "suppressed"
    created_at: int
    id: int = 0
    attempts: int = 0
    sent_at: int | None = None
    error: str | None = None


class CatalogVersion(msgspec.Struct, frozen=True):
    """A published price catalog: what the provider was made to match, with resolved ids."""

    version: int
    published_at: int
    actor: str
    digest: str  # of `catalog`; equal digests mean nothing changed
    catalog: dict[str, Any]  # see controlplane.catalog.Resolved


class WebhookRecord(msgspec.Struct, frozen=True):
    """A provider webhook event processed to the end."""

    event_id: str
    type: str
    created: int | None
    outcome: str  # what was done, e.g. "provisioned", "ignored: ...", "duplicate"


class ClosedPeriod(msgspec.Struct, frozen=True):
    """A billing period whose invoice is finalized (keyed by invoice id)."""

    invoice_id: str
    org_id: str
    period_start: int
    period_end: int
    finalized_at: int


class OrgChange(msgspec.Struct, frozen=True):
    """What a webhook changes on an org, applied with the event's record in one transaction."""

    org_id: str
    customer: str | None = None  # None: keep
    subscription: str | None = None  # None: keep
    subscription_status: str | None = None  # None: keep
    plan: str | None = None  # None: no new plan period
    effective_from: int = 0


# ---------------------------------------------------------------------------------------------
# Storage


class Storage(abc.ABC):
    """Durable state: events, dirty buckets, ledger, orgs, flags, audit, job runs."""

    name: ClassVar[str]
    sign: Callable[[str], str] | None = None
    """Signs each new audit record's hash (set from `[audit]` by the control plane)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open connections. Does not migrate."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource; safe to call twice."""

    # schema -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def migrate(self) -> list[str]:
        """Apply pending migrations in order; return the names applied."""

    @abc.abstractmethod
    async def migration_status(self) -> MigrationStatus:
        """Applied and pending migrations. Raises MigrationError when the two disagree."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StorageError when the store cannot answer."""

    @abc.abstractmethod
    async def pin_setting(self, key: str, value: str) -> None:
        """Record a setting that must never change once data depends on it (e.g. bucket size).

        Raises ConfigError when a different value was pinned before.
        """

    # ingest and usage ---------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_events(
        self, events: Sequence[StoredEvent], bucket_seconds: int
    ) -> IngestResult:
        """Store a batch in one transaction, skipping (source, event_id) pairs already stored,
        and mark every (org, bucket) it touched dirty. Returns after commit."""

    @abc.abstractmethod
    async def usage(
        self, org_id: str | None, meter: str | None, start: int | None, end: int | None
    ) -> list[UsageTotal]:
        """Per-bucket totals computed from stored events (open and closed buckets)."""

    # rollup and ledger --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, job: str, *, wait: bool = False) -> AsyncIterator[bool]:
        """Hold `job` exclusively among every process sharing this store while the block
        runs; yields False (without waiting, unless `wait`) when another one holds it.

        A store only one process can use has nothing to arbitrate: the default yields True.
        """
        yield True

    @abc.abstractmethod
    async def rollup_step(
        self,
        closed_before: int,
        bucket_seconds: int,
        limit: int,
        planner: RollupPlanner,
        org_id: str | None = None,
        unplanned_allowed: Sequence[str] | None = None,
    ) -> tuple[int, list[NewRow]]:
        """Take up to `limit` dirty buckets ending at or before `closed_before` (and of
        `org_id` when given), let `planner` decide the revisions, write them and clear those
        dirty marks in one transaction (the marks of buckets the plan holds are kept, with
        the reason, and skipped until ingest marks them dirty again). Returns (buckets taken,
        rows written).

        With `unplanned_allowed`, a bucket whose start no stored plan covers is taken only if
        its org is listed (the legacy biller answered for it); the others stay dirty."""

    @abc.abstractmethod
    async def unplanned_orgs(self, closed_before: int, bucket_seconds: int) -> list[str]:
        """Orgs with a dirty bucket ending at or before `closed_before` whose start no stored
        plan covers: the rollup asks the legacy biller about them."""

    @abc.abstractmethod
    async def ledger(
        self,
        *,
        org_id: str | None = None,
        state: RowState | None = None,
        start: int | None = None,
        end: int | None = None,
        limit: int = 1000,
        attempted: bool | None = None,
        after_id: int = 0,
    ) -> list[LedgerRow]:
        """Ledger rows, oldest first, filtered by org, state, bucket start in [start, end) and
        whether a delivery was attempted; `after_id` pages on."""

    @abc.abstractmethod
    async def sendable(
        self,
        after_id: int,
        limit: int,
        org_id: str | None = None,
        until: int | None = None,
        *,
        claim: Claim,
    ) -> list[SendItem]:
        """Claim and return the rows the sender may act on, by id: `pending`, and
        `held`/`no_customer` rows whose org now has a customer. Optionally one org, and
        buckets starting before `until`.

        Rows claimed by another live claimant are skipped, and so is every row of an
        (org, meter) another claimant is working on: one sender per rounding chain and per
        provider lane. A claim lapses at `claim.until`; a dead sender's rows are then taken
        over."""

    @abc.abstractmethod
    async def release_claims(self, claimant: str) -> None:
        """Drop every claim `claimant` still holds (the end of a sender pass)."""

    @abc.abstractmethod
    async def seam(self, bucket_start: int) -> SeamRows:
        """What the ledger holds for buckets starting at or after `bucket_start`, for the
        rules that keep the cutover seam: rows the provider may have, rows excluded as
        before `bill_from`."""

    @abc.abstractmethod
    async def record_attempts(
        self,
        row_ids: Sequence[int],
        at: int,
        claim: Claim | None = None,
        *,
        flag_versions: Mapping[str, int] | None = None,
        series: Mapping[int, Attempt] | None = None,
    ) -> dict[int, int]:
        """Count a delivery attempt for each row before it is made, so that an ambiguous
        outcome (timeout, dropped connection, crash) is known afterwards. Returns the rows
        counted, with their quantity now.

        With `claim`, only rows its claimant still holds are counted, and the hold is renewed
        until `claim.until`: after a hold lapsed, another sender may have taken a row, or
        re-derived its quantity, and the caller must not send what it read before.

        With `flag_versions` (the runtime version of each flag the caller's snapshot was read
        at, 0 for none), raises FlagsChanged and counts nothing when a flag changed since:
        checked in the same transaction, serialized with :meth:`write_flags`.

        `series` gives, per row, what the call is made with: recorded on the row
        (`attempt_customer`, `attempt_timestamp`, `attempt_key`, with `last_attempt_at`), so
        that a retry repeats it. Releasing the only attempt clears them."""

    @abc.abstractmethod
    async def release_attempts(self, row_ids: Sequence[int]) -> None:
        """Take back attempts recorded by `record_attempts` for calls that were not made."""

    @abc.abstractmethod
    async def settle(
        self, settlements: Sequence[Settlement], at: int, actor: str, claimant: str = ""
    ) -> int:
        """Apply sender decisions in one transaction: each row still `pending` (or `held`)
        moves to its new state and leaves its claim; every move to `sent` is audited.
        An exclusion re-derives the quantities of its rounding chain, leaving alone the rows
        another live claimant holds. Returns rows moved."""

    @abc.abstractmethod
    async def cancel_rows(
        self, row_ids: Sequence[int], at: int, actor: str, reason: str, detail: str | None = None
    ) -> int:
        """Move rows the provider has cancelled (`sent`, or attempted without a definite
        answer) to `cancelled` with `reason`, each audited as ``ledger.cancelled``, in one
        transaction. Returns rows moved."""

    @abc.abstractmethod
    async def late_rows(self, period: ClosedPeriod) -> list[LedgerRow]:
        """Rows of the period's org sent with a timestamp inside it whose first attempt came
        at or after the invoice was finalized: they reached the provider too late for it."""

    @abc.abstractmethod
    async def reissue_rows(
        self, row_ids: Sequence[int], at: int, actor: str, detail: str
    ) -> list[NewRow]:
        """For each row still `sent`: move it to `cancelled`/`reissued` with `detail` and
        append the next revision of its bucket with the same value, `pending`, each audited
        as ``ledger.reissued``, in one transaction; the rounding chains are re-derived. A
        reissued row no longer counts toward its bucket's ledger total (its usage lives on in
        the new revision). Returns the revisions appended."""

    @abc.abstractmethod
    async def live_claims(self, at: int) -> int:
        """Rows a sender holds a claim on that lasts past `at` (a send pass in progress)."""

    # orgs -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_org(self, org_id: str) -> Org | None: ...

    @abc.abstractmethod
    async def set_org(
        self,
        org_id: str,
        *,
        customer: str | None,
        plan: str | None,
        effective_from: int,
        at: int,
        audit: AuditEntry,
    ) -> Org:
        """Set the org's provider customer and/or start a plan period; audited."""

    @abc.abstractmethod
    async def orgs_without_customer(self, plan: str, at: int) -> list[str]:
        """Stored orgs on `plan` at `at` that have no provider customer (for cutover
        preflight)."""

    # flags and audit ------------------------------------------------------------------------

    @abc.abstractmethod
    async def runtime_flags(self) -> dict[str, RuntimeFlag]: ...

    @abc.abstractmethod
    async def write_flags(
        self,
        writes: Sequence[FlagWrite],
        audit: Sequence[AuditEntry],
        at: int,
        *,
        guard: FlagGuard | None = None,
        flag_versions: Mapping[str, int] | None = None,
        static: StaticFlags | None = None,
    ) -> dict[str, RuntimeFlag]:
        """Write every flag and its audit rows in one transaction, or nothing.

        Raises FlagRefused (rule `version`) when a flag changed since it was read: a written
        one, or any in `flag_versions`. `guard` runs inside the transaction before anything
        is written, reading the seam as that transaction sees it; no attempt is recorded
        between its check and the write. With `static`, the static layers' values are
        recorded as `static.after` if they still are `static.before` (else `version`)."""

    @abc.abstractmethod
    async def static_flags(self) -> dict[str, Any] | None:
        """The static layers' flag values as last recorded (None: never)."""

    @abc.abstractmethod
    async def append_audit(self, entries: Sequence[AuditEntry], at: int) -> None: ...

    @abc.abstractmethod
    async def audit_log(
        self, *, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """Newest first."""

    # jobs ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def audit_chain(self, after_id: int, limit: int) -> list[AuditRecord]:
        """Audit records with id > `after_id`, oldest first: the chain, page by page."""

    @abc.abstractmethod
    async def record_job_run(self, run: JobRun) -> None: ...

    @abc.abstractmethod
    async def job_runs(self, job: str | None = None, limit: int = 50) -> list[JobRun]:
        """Newest first."""

    @abc.abstractmethod
    async def last_job_success(self, job: str) -> float | None:
        """When the newest run of `job` that did not fail (outcome `ok` or `skipped`) ended,
        or None when none did."""

    # metrics ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def ledger_counts(self) -> list[LedgerCount]:
        """Ledger rows per (state, reason); pairs without rows are absent."""

    @abc.abstractmethod
    async def dirty_backlog(self, closed_before: int, bucket_seconds: int) -> DirtyBacklog:
        """Dirty buckets ending at or before `closed_before` (those the rollup would take
        now): how many, and the start of the oldest."""

    # parity -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def usage_by_org(self, meter: str, start: int, end: int) -> dict[str, int]:
        """Per org, the exact sum (micro-units) of `meter` over buckets starting in
        [start, end), computed from stored events (never from the ledger). Orgs without
        events for the meter in the window are absent."""

    @abc.abstractmethod
    async def record_parity_run(
        self, run: ParityRun, drifts: Sequence[OrgDrift], alert: ParityAlert | None
    ) -> int | None:
        """Store a checked bucket with its mismatching orgs and the alert it raised, in one
        transaction. Returns the run's id, or None when that bucket was already checked
        (nothing is written then)."""

    @abc.abstractmethod
    async def parity_runs(
        self, meter: str, *, limit: int = 100, start: int | None = None, end: int | None = None
    ) -> list[ParityRun]:
        """Stored runs of `meter` with bucket_start in [start, end), newest bucket first."""

    @abc.abstractmethod
    async def parity_run(self, run_id: int) -> tuple[ParityRun, list[OrgDrift]] | None:
        """One stored run and its mismatching orgs."""

    @abc.abstractmethod
    async def parity_clean_tail(self, meter: str) -> list[int]:
        """Bucket starts of the clean runs of `meter` newer than its newest unclean run,
        newest first (all clean runs when none is unclean)."""

    @abc.abstractmethod
    async def parity_alerts(
        self,
        meter: str,
        *,
        since: int | None = None,
        states: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[ParityAlert]:
        """Alerts of `meter` created at or after `since`, in `states`, newest first."""

    @abc.abstractmethod
    async def record_alert(self, alert: ParityAlert) -> int | None:
        """Store an alert raised outside a parity run (a job's: `meter` is ``job:<name>``).
        Returns its id, or None when an alert with the same (`meter`, `bucket_start`) exists
        (nothing is written then)."""

    @abc.abstractmethod
    async def update_parity_alert(
        self, alert_id: int, *, state: str, attempts: int, sent_at: int | None, error: str | None
    ) -> None:
        """Record a delivery attempt's outcome."""

    # catalog and webhooks -----------------------------------------------------------------

    @abc.abstractmethod
    async def catalog_version(self, version: int | None = None) -> CatalogVersion | None:
        """A published catalog version (the newest when `version` is None)."""

    @abc.abstractmethod
    async def publish_catalog(
        self, catalog: dict[str, Any], digest: str, actor: str, at: int, audit: AuditEntry
    ) -> CatalogVersion:
        """Store `catalog` as the next version with its audit record, in one transaction."""

    @abc.abstractmethod
    async def webhook_outcome(self, event_id: str) -> str | None:
        """The recorded outcome of a processed webhook event, or None if not processed."""

    @abc.abstractmethod
    async def record_webhook(
        self,
        record: WebhookRecord,
        at: int,
        *,
        org: OrgChange | None = None,
        closed: ClosedPeriod | None = None,
        audit: Sequence[AuditEntry] = (),
    ) -> bool:
        """Apply a webhook's storage changes and mark its event processed, in one transaction.
        Returns False (and changes nothing) when the event was already recorded."""

    @abc.abstractmethod
    async def org_for_billing(
        self, *, subscription: str | None, customer: str | None
    ) -> str | None:
        """The org whose current subscription is `subscription`, else whose customer is
        `customer`."""

    @abc.abstractmethod
    async def closed_periods(self, org_ids: Sequence[str]) -> list[ClosedPeriod]:
        """Finalized billing periods of these orgs, oldest first."""


# ---------------------------------------------------------------------------------------------
# Ingest

EventSink = Callable[[Sequence[Any], str], Awaitable[IngestResult]]
"""Hands a batch of raw event objects (and the default `source`) to the pipeline."""


class IngestSource(abc.ABC):
    """A source that pulls events from somewhere (a stream, a file) into the pipeline."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self, sink: EventSink) -> None:
        """Begin consuming; every batch goes through `sink`, which validates and stores it."""

    @property
    def label(self) -> str:
        """Names this source in /readyz and /metrics (e.g. its stream)."""
        return self.name

    def failing(self) -> str | None:
        """None while the source consumes normally; else since when, and why, it cannot."""
        return None

    @property
    def dead_lettered(self) -> int:
        """Entries this source set aside as invalid (a dead-letter stream) since it started."""
        return 0

    @abc.abstractmethod
    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Billing


class MeterEvent(msgspec.Struct, frozen=True):
    """One ledger row as the provider receives it."""

    identifier: str
    event_name: str
    customer: str
    value: int  # whole units
    timestamp: int  # unix seconds: inside the row's bucket, or the current billing period
    idempotency_key: str = ""  # "": the identifier


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"  # the provider took it
    DUPLICATE = "duplicate"  # the provider already had this identifier: delivered before
    REJECTED = "rejected"  # permanent refusal; resending will not help
    RETRY = "retry"  # transient (rate limit, 5xx); nothing was recorded, try later
    AMBIGUOUS = "ambiguous"  # the call may or may not have been applied (timeout, drop)


class Delivery(msgspec.Struct, frozen=True):
    outcome: Outcome
    message: str | None = None
    provider_id: str | None = None
    retry_after: float | None = None


class Billing(abc.ABC):
    """A billing provider that takes meter events."""

    name: ClassVar[str]
    max_event_age_seconds: ClassVar[int | None] = None
    """Oldest event timestamp the provider accepts, relative to now (None: no limit)."""
    throttled: int = 0
    """Rate-limit answers (HTTP 429) the provider gave since start, retried ones included."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def rate_limit(self) -> float | None:
        """Calls per second the sender may make (None: unlimited)."""

    @abc.abstractmethod
    async def send(self, event: MeterEvent) -> Delivery:
        """Deliver one meter event, using `event.identifier` as the idempotency key."""

    @abc.abstractmethod
    async def cancel(self, event_name: str, identifier: str) -> Delivery:
        """Cancel a delivered meter event by identifier (where the provider allows it)."""


# ---------------------------------------------------------------------------------------------
# Legacy biller


class LegacyError(ControlPlaneError):
    """The legacy biller's source failed."""


class CapabilityUnavailable(LegacyError, NotImplementedError):
    """The legacy plugin cannot answer this question (it is not configured to)."""

    def __init__(self, plugin: str, capability: str, how: str = "") -> None:
        self.capability = capability
        super().__init__(
            f"legacy plugin {plugin!r} cannot tell {capability}" + (f": {how}" if how else "")
        )


class LegacyCapability(enum.StrEnum):
    BILLED_UNTIL = "billed_until"
    PLAN = "plan"


class LegacySource(abc.ABC):
    """The legacy biller, as the control plane reads it: what it billed per org and window.

    `usage` is required. `billed_until` and `plan` are optional capabilities: a plugin lists
    the ones it can answer in :meth:`capabilities`, and the others raise
    :class:`CapabilityUnavailable`, never a made-up answer.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare to query; must not fail only because the legacy system is down."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def usage(self, start: int, end: int) -> dict[str, Decimal]:
        """Per org, the exact usage the legacy biller counts for the parity meter in the
        window [start, end) (unix seconds). Orgs without usage may be absent. Raises
        LegacyError when the source fails or answers something that is not exact."""

    def capabilities(self) -> frozenset[LegacyCapability]:
        """The optional questions this plugin, as configured, can answer."""
        return frozenset()

    async def billed_until(self) -> int | None:
        """Unix seconds up to which the legacy biller has billed (None: nothing yet)."""
        raise CapabilityUnavailable(self.name, LegacyCapability.BILLED_UNTIL)

    async def plan(self, org_id: str) -> str | None:
        """The org's plan according to the legacy biller (None: it does not know the org)."""
        raise CapabilityUnavailable(self.name, LegacyCapability.PLAN)
