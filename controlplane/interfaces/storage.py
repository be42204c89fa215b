"""The storage contracts: one narrow abstract class per domain, and :class:`Storage`, all of them.

A service takes the contracts it uses (the sender a :class:`SendStore`, the parity checker a
:class:`ParityStore`); a storage plugin implements :class:`Storage`, so one class serves every
domain and a missing method fails when the class is built.

=================  =========================================================================
contract           holds
=================  =========================================================================
StorageLifecycle   start, close, migrations, ping, pinned settings, exclusive jobs
EventStore         usage events and the bucket totals computed from them
LedgerStore        the rollup's writes, ledger reads, the dirty backlog
GaugeStore         gauge meters' series: their state, and the usage derived from them
SendStore          claims, attempts, settlements, cancellations, re-issues, the seam
OrgStore           orgs, customers, plan periods
FlagStore          runtime flags, the static layers' record
AuditStore         the hash-chained audit log
ParityStore        parity runs, mismatches, alerts
MoneyParityStore   billable ledger quantities per period, money parity runs
ReconcileStore     reconciliations of the ledger with the provider's aggregates
CatalogStore       published catalog versions
WebhookStore       processed webhook events, closed billing periods
ProviderErrorStore the provider's error reports: rows held, customers flagged
JobStore           scheduled job runs
=================  =========================================================================
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar

from controlplane.interfaces.records import (
    Attempt,
    AuditEntry,
    AuditRecord,
    BilledRange,
    CatalogVersion,
    Claim,
    ClosedPeriod,
    DirtyBacklog,
    FlagGuard,
    FlagWrite,
    GaugePlan,
    GaugePlanner,
    HeldErrors,
    IngestResult,
    JobRun,
    LedgerCount,
    MeterQuantity,
    MigrationStatus,
    MoneyOrgResult,
    MoneyRun,
    Org,
    OrgChange,
    OrgDrift,
    ParityAlert,
    ParityRun,
    ProviderError,
    ReconcileRun,
    RollupPlanner,
    RowMove,
    RuntimeFlag,
    SeamRows,
    SendItem,
    SentCell,
    SeriesUpdate,
    Settlement,
    StaticFlags,
    StoredEvent,
    UsageTotal,
    WebhookRecord,
)
from controlplane.ledger import LedgerRow, NewRow, RowState


class StorageLifecycle(abc.ABC):
    """Opening, closing and schema: what every store does before and after the rest.

    All plugins share one lifecycle: ``await start()`` once before use, ``await close()`` once
    at shutdown."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self, *, create: bool = True) -> None:
        """Open connections. Does not migrate. With `create` false, raises NoDatabase rather
        than create a database that is not there (what read-only commands need)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource; safe to call twice."""

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

    @contextlib.asynccontextmanager
    async def exclusive(self, job: str, *, wait: bool = False) -> AsyncIterator[bool]:
        """Hold `job` exclusively among every process sharing this store while the block
        runs; yields False (without waiting, unless `wait`) when another one holds it.

        A store only one process can use has nothing to arbitrate: the default yields True.
        """
        yield True


class EventStore(abc.ABC):
    """Usage events, and the per-bucket totals computed from them (never from the ledger)."""

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

    @abc.abstractmethod
    async def untokened_events(self, types: Sequence[str], since_ms: int) -> int:
        """Events of `types` stored with a time from `since_ms` (unix ms) on that carried no
        capability token (for the cutover preflight)."""

    @abc.abstractmethod
    async def usage_by_org(self, meter: str, start: int, end: int) -> dict[str, int]:
        """Per org, the exact sum (micro-units) of `meter` over buckets starting in
        [start, end), computed from stored events (never from the ledger). Orgs without
        events for the meter in the window are absent."""


class LedgerStore(abc.ABC):
    """The rollup's writes into the ledger, and reads of the ledger and its backlog."""

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
    async def dirty_backlog(self, closed_before: int, bucket_seconds: int) -> DirtyBacklog:
        """Dirty buckets ending at or before `closed_before` (those the rollup would take
        now): how many, and the start of the oldest."""

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
    async def ledger_counts(self) -> list[LedgerCount]:
        """Ledger rows per (state, reason); pairs without rows are absent."""

    @abc.abstractmethod
    async def late_rows(self, period: ClosedPeriod) -> list[LedgerRow]:
        """Rows of the period's org sent with a timestamp inside it that reached the provider
        after the invoice was finalized: every attempt came at or after it, or the provider
        accepted first-hand (not "already exists", not a replayed answer) an attempt made at
        or after it.
        They reached the provider too late for the invoice."""

    @abc.abstractmethod
    async def unsure_rows(self, period: ClosedPeriod) -> list[LedgerRow]:
        """Rows of the period's org sent with a timestamp inside it, answered "already
        exists" (or with an earlier call's replayed answer) by an attempt made at or after the
        invoice was finalized while an earlier attempt came before it: whether they reached
        the provider in time for the invoice cannot be told from the ledger."""


class GaugeStore(abc.ABC):
    """Gauge (`time_weighted`) meters: each series' state and the points ingest stored for it
    (:meth:`EventStore.insert_events` stores an event's points and marks their series due)."""

    @abc.abstractmethod
    async def gauge_step(
        self,
        until: int,
        limit: int,
        planner: GaugePlanner,
        org_id: str | None = None,
        after: tuple[str, str, str] | None = None,
    ) -> tuple[list[tuple[str, str, str]], GaugePlan]:
        """Take up to `limit` series due for derivation up to `until` (a bucket start), in
        (meter, org, series) order after `after`, and of `org_id` when given: those with a
        level other than zero derived to before `until`, and those with a point stored since
        their last derivation at a time before `until`. Let `planner` derive them; in one
        transaction, add its totals to the bucket totals, mark those (org, bucket) pairs
        dirty and store each series' new state. Returns the keys taken, and the plan."""

    @abc.abstractmethod
    async def gauge_series(self, meter: str | None = None) -> list[SeriesUpdate]:
        """Every stored series' state (of `meter` when given), in key order."""


class SendStore(abc.ABC):
    """The sender's side of the ledger: claims, attempts, settlements, cancellations and
    re-issues, and the seam the cutover rules read."""

    @abc.abstractmethod
    async def sendable(
        self,
        after_id: int,
        limit: int,
        org_id: str | None = None,
        until: int | None = None,
        *,
        claim: Claim,
        billed_only: bool = False,
        billed_before: int | None = None,
    ) -> list[SendItem]:
        """Claim and return the rows the sender may act on, by id: `pending`, and
        `held`/`no_customer` rows whose org now has a customer. Optionally one org, and
        buckets starting before `until`; with `billed_only`, only rows of buckets billed
        here (a row of any meter `sent`, not an offset). Each item says whether its bucket
        is billed here (`billed`) when `billed_only`, or its bucket starts before
        `billed_before`; past it, `billed` is False.

        Rows claimed by another live claimant are skipped, and so is every row of an
        (org, meter) another claimant is working on, and of a bucket another claimant holds
        (:meth:`hold_billed_buckets`): one sender per rounding chain and per
        provider lane. A claim lapses at `claim.until`; a dead sender's rows are then taken
        over."""

    @abc.abstractmethod
    async def release_claims(self, claimant: str) -> None:
        """Drop every claim `claimant` still holds (the end of a sender pass)."""

    @abc.abstractmethod
    async def live_claims(self, at: int, other_than: str | None = None) -> int:
        """Rows a sender holds a claim on that lasts past `at` (a send pass in progress), but
        those of claimant `other_than`."""

    @abc.abstractmethod
    async def hold_billed_buckets(self, claim: Claim) -> bool:
        """Hold every bucket billed here (claim its `sent` rows) for `claim.claimant` until
        `claim.until` or :meth:`release_claims`: no :meth:`sendable` returns a row of a bucket
        another claimant holds. False, holding nothing, when another live claimant holds
        some already (another hand-back runs)."""

    @abc.abstractmethod
    async def seam(self, bucket_start: int) -> SeamRows:
        """What the ledger holds for buckets starting at or after `bucket_start`, for the
        rules that keep the cutover seam: rows the provider may have, rows excluded as
        before `bill_from`."""

    @abc.abstractmethod
    async def billed_ranges(
        self, start: int, end: int, bucket_seconds: int, org_id: str | None = None
    ) -> list[BilledRange]:
        """The buckets starting in [start, end) (bucket-aligned) that the control plane bills:
        those with at least one ledger row in state `sent`, of any meter. Per org (`org_id`
        alone when given), consecutive buckets are one range `[start, end)`; a bucket without
        such a row breaks a range. Ordered by org, then start."""

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
    async def settle(self, settlements: Sequence[Settlement], at: int, claimant: str = "") -> int:
        """Apply sender decisions in one transaction: each row still `pending` (or `held`)
        moves to its new state and leaves its claim, and its settlement's `audit` record (if
        any) is appended; a settlement whose row moved already appends nothing. An exclusion
        re-derives the quantities of its rounding chain, leaving alone the rows another live
        claimant holds. Returns rows moved."""

    @abc.abstractmethod
    async def cancel_rows(
        self, row_ids: Sequence[int], at: int, actor: str, reason: str, detail: str | None = None
    ) -> int:
        """Move rows the provider has cancelled (`sent`, or attempted without a definite
        answer) to `cancelled` with `reason`, each audited as ``ledger.cancelled``, in one
        transaction. Returns rows moved."""

    @abc.abstractmethod
    async def reissue_rows(
        self,
        row_ids: Sequence[int],
        at: int,
        actor: str,
        detail: str,
        *,
        handed_back: bool = False,
    ) -> list[NewRow]:
        """For each row still `sent`, `held` for a provider error (the provider reported it
        invalid, so it never counted there), or, with `handed_back`, `cancelled` at the
        provider by a rollback (`rolled_back`, attempted) whose bucket then stayed billed
        here: move it to
        `cancelled`/`reissued` with `detail` and
        append the next revision of its bucket with the same value, `pending`, each audited
        as ``ledger.reissued``, in one transaction; the rounding chains are re-derived. A
        reissued row no longer counts toward its bucket's ledger total (its usage lives on in
        the new revision). Returns the revisions appended."""

    @abc.abstractmethod
    async def offset_rows(
        self, row_ids: Sequence[int], at: int, actor: str, detail: str
    ) -> list[LedgerRow]:
        """For each row still `sent` that reached the provider and has no offset but undone
        ones (an offset itself is offset only to undo it), append
        the next revision of its bucket holding its negative value and quantity, `pending`,
        naming it (`offsets_id`) and called as it was (its customer and timestamp, under its
        own identifier), audited ``ledger.offset_appended``, in one transaction. The row stays
        `sent` until the provider takes its offset (:meth:`complete_offsets`). An offsetting
        row moves no usage: it never counts toward its bucket's ledger total, keeps its
        quantity, and shares the rounding chain of the row it offsets. Returns the rows
        appended."""

    @abc.abstractmethod
    async def complete_offsets(self, settlements: Sequence[Settlement], at: int, actor: str) -> int:
        """The provider took these offsetting rows: each one still `pending` moves to `sent`
        and the row it offsets (still `sent`) to `cancelled`/`offset`, audited as
        ``ledger.offset``, in one transaction; the rounding chains are re-derived. When the
        row it offsets is itself an offset, that offset is undone: the row it took off is
        `sent` again, audited as ``ledger.offset_undone``. Returns the offsets completed."""

    @abc.abstractmethod
    async def unsent_offsets(self) -> list[LedgerRow]:
        """Offsetting rows still `pending` (their call failed or was never answered)."""


class OrgStore(abc.ABC):
    """Orgs: their provider customer and plan periods."""

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
        """Set the org's provider customer and/or start a plan period; audited. A plan change
        releases the buckets the rollup held for the org (an unknown plan): it tries them again."""

    @abc.abstractmethod
    async def orgs_without_customer(self, plan: str, at: int) -> list[str]:
        """Stored orgs on `plan` at `at` that have no provider customer (for cutover
        preflight)."""

    @abc.abstractmethod
    async def subscription_statuses(self) -> dict[str, int]:
        """How many orgs have a provider subscription in each status (for the metrics)."""


class FlagStore(abc.ABC):
    """Runtime flag values, and the record of the static layers' values."""

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


class AuditStore(abc.ABC):
    """The append-only, hash-chained audit log."""

    sign: Callable[[str], str] | None = None
    """Signs each new audit record's hash (set from `[audit]` by the control plane)."""

    @abc.abstractmethod
    async def append_audit(self, entries: Sequence[AuditEntry], at: int) -> None: ...

    @abc.abstractmethod
    async def audit_log(
        self, *, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """Newest first."""

    @abc.abstractmethod
    async def audit_chain(self, after_id: int, limit: int) -> list[AuditRecord]:
        """Audit records with id > `after_id`, oldest first: the chain, page by page."""


class ParityStore(abc.ABC):
    """The parity checker's runs, their mismatching orgs, and the alerts raised."""

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


class MoneyParityStore(abc.ABC):
    """Money parity: the ledger's billable quantities per period, and the stored runs."""

    @abc.abstractmethod
    async def ledger_quantities(self, start: int, end: int) -> list[MeterQuantity]:
        """Per (org, meter), the whole units of ledger rows with bucket start in [start, end)
        that some biller charges: every row (shadow's pending ones included) except rows
        excluded as `free_plan` and rows cancelled as `reissued` (their usage lives on in a
        later revision). Pairs summing to 0 are included; pairs without rows are absent."""

    @abc.abstractmethod
    async def record_money_run(self, run: MoneyRun, orgs: Sequence[MoneyOrgResult]) -> int:
        """Store a run and its orgs in one transaction; returns the run's id."""

    @abc.abstractmethod
    async def money_runs(self, *, limit: int = 100) -> list[MoneyRun]:
        """Stored runs, the newest period first (then the newest check)."""

    @abc.abstractmethod
    async def money_run(self, run_id: int) -> tuple[MoneyRun, list[MoneyOrgResult]] | None:
        """One run with its orgs (by org id)."""


class ReconcileStore(abc.ABC):
    """Reconciliations of the ledger with the provider's books (controlplane.reconcile)."""

    @abc.abstractmethod
    async def record_reconcile_run(self, run: ReconcileRun) -> int:
        """Store a run with its findings; returns its id."""

    @abc.abstractmethod
    async def reconcile_runs(self, *, limit: int = 50) -> list[ReconcileRun]:
        """Stored runs, the newest check first."""

    @abc.abstractmethod
    async def sent_cells(self, start: int, end: int, org_id: str | None) -> list[SentCell]:
        """The units sent per (org, customer, meter, hour of the timestamp sent), for rows in
        state `sent` whose timestamp sent is in [start, end) (one org's, or every org's)."""

    @abc.abstractmethod
    async def stamped_rows(
        self, org_id: str, meter: str, customer: str, start: int, end: int
    ) -> list[LedgerRow]:
        """The rows of (org, meter), in any state, called for `customer` with a timestamp in
        [start, end), oldest first."""

    @abc.abstractmethod
    async def move_rows(self, moves: Sequence[RowMove], at: int) -> list[int]:
        """Apply each move whose row is still in its expected state and reason, with its
        audit record, in one transaction; returns the ids of the rows moved. A row moved
        between `sent` and `held` keeps its quantity (attempted rows are frozen in their
        rounding chain)."""


class CatalogStore(abc.ABC):
    """Published price catalog versions."""

    @abc.abstractmethod
    async def catalog_version(self, version: int | None = None) -> CatalogVersion | None:
        """A published catalog version (the newest when `version` is None)."""

    @abc.abstractmethod
    async def publish_catalog(
        self, catalog: dict[str, Any], digest: str, actor: str, at: int, audit: AuditEntry
    ) -> CatalogVersion:
        """Store `catalog` as the next version with its audit record, in one transaction."""


class WebhookStore(abc.ABC):
    """Provider webhook events processed, with the org and period changes they bring."""

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


class JobStore(abc.ABC):
    """Scheduled job runs."""

    @abc.abstractmethod
    async def record_job_run(self, run: JobRun) -> None: ...

    @abc.abstractmethod
    async def job_runs(self, job: str | None = None, limit: int = 50) -> list[JobRun]:
        """Newest first."""

    @abc.abstractmethod
    async def last_job_success(self, job: str) -> float | None:
        """When the newest run of `job` that did not fail (outcome `ok` or `skipped`) ended,
        or None when none did."""


class ProviderErrorStore(abc.ABC):
    """The provider's asynchronous error reports, applied to the ledger and the orgs."""

    @abc.abstractmethod
    async def hold_provider_errors(
        self, record: WebhookRecord, errors: Sequence[ProviderError], at: int, actor: str
    ) -> HeldErrors | None:
        """Record the provider's error report `record` as processed and, in the same
        transaction, move each reported row (by identifier) that reached the provider
        (`sent`, or attempted and still `pending` or `held`) to `held`/`provider_error` with
        the error's code as `detail`, audited as ``ledger.held``; a row already held for a
        provider error is left alone. A ``meter_event_customer_not_found`` row also flags its
        org's customer mapping (`Org.customer_error`, audited as ``org.customer_flagged``)
        until a customer is set again. Returns None, changing nothing, when `record`'s event
        was recorded before."""


class Storage(
    StorageLifecycle,
    EventStore,
    LedgerStore,
    GaugeStore,
    SendStore,
    OrgStore,
    FlagStore,
    AuditStore,
    ParityStore,
    MoneyParityStore,
    ReconcileStore,
    CatalogStore,
    WebhookStore,
    ProviderErrorStore,
    JobStore,
):
    """Durable state: every storage contract, implemented by one plugin class."""
