"""The records plugins and the core exchange: what is stored, read back, and decided.

Plain msgspec structs (and the callables that pass them); the contracts that take them are in
:mod:`controlplane.interfaces.storage`, :mod:`~controlplane.interfaces.ingest`,
:mod:`~controlplane.interfaces.billing` and :mod:`~controlplane.interfaces.legacy`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from controlplane.errors import ControlPlaneError
from controlplane.ledger import LedgerRow, NewRow, RowState


class PluginConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every plugin's config section; the `backend` key names the plugin."""


class StorageConfig(PluginConfig, frozen=True):
    """Base of every storage plugin's config section."""

    def where(self) -> str:
        """Where the data lives, as people name it (a file, a host and database), with no
        secret in it: the CLI says it beside the config file it read."""
        return type(self).__name__


class StoredEvent(msgspec.Struct, frozen=True, array_like=True):
    """A validated usage event, with the meter values it carries, ready to store."""

    source: str
    event_id: str
    type: str
    org_id: str
    time_ms: int
    data: bytes  # the event's `data` object as JSON
    values: tuple[tuple[str, int], ...]  # (meter, micro-units) for each meter it feeds
    points: tuple[GaugePoint, ...] = ()  # what it says to each gauge meter it feeds
    plan: str | None = None  # the plan its capability token states (verified at ingest)
    plan_issued_at: int | None = None  # when that token was issued: the newest one wins


class GaugePoint(msgspec.Struct, frozen=True, array_like=True):
    """One event's reading for one series of a gauge (`time_weighted`) meter, as stored."""

    meter: str
    series: str
    mode: str  # `level`, `delta`, `state` (its fields only) or `end`
    value: str | None  # the exact decimal level or change (None for `state` and `end`)
    fields: str  # JSON object: the state fields the meter's `where` reads


class SeriesPoint(msgspec.Struct, frozen=True, array_like=True):
    """A stored gauge point read back for derivation; `seq` orders ingest, not time."""

    time_ms: int
    ord: str  # `source` and event id: orders points of the same millisecond by content
    seq: int
    mode: str
    value: str | None
    fields: str


class GaugeSeries(msgspec.Struct, frozen=True):
    """One series due for derivation: its state at `derived_to` and the points to fold.

    Usage of every bucket before `derived_to` is in the bucket totals, derived from the
    points with `seq <= folded_seq` and a time before `derived_to` (the folded ones). With
    `late`, some point before `derived_to` is not folded: `points` are then every point
    before the target, from the first; else those from `derived_to` on."""

    meter: str
    org_id: str
    series: str
    derived_to: int  # unix seconds, a bucket start
    folded_seq: int
    level: str  # exact decimal
    fields: str  # JSON object
    late: bool
    points: list[SeriesPoint]  # in timeline order: by time, then by `ord`


class GaugeBatch(msgspec.Struct, frozen=True):
    """The series one derivation step takes, and the bucket start it derives up to."""

    until: int
    series: list[GaugeSeries]


class SeriesUpdate(msgspec.Struct, frozen=True, array_like=True):
    """A series' state after derivation (its pending time is read back by the store)."""

    meter: str
    org_id: str
    series: str
    derived_to: int
    folded_seq: int
    level: str
    fields: str
    active: bool  # a level other than zero: its buckets are derived without events


class GaugePlan(msgspec.Struct, frozen=True):
    """What one derivation step writes: micro-units added to bucket totals (whose (org,
    bucket) become dirty), the series' new states, and snapshots that reset a level the
    deltas before them disagreed with."""

    totals: list[UsageTotal]
    series: list[SeriesUpdate]
    resets: int = 0


GaugePlanner = Callable[[GaugeBatch], GaugePlan]


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
    subscription_status: str | None = None  # Stripe's: "active", "incomplete", "past_due"...
    customer_error: str | None = None  # the provider's code when it did not find `customer`

    def plan_at(self, when: int) -> str | None:
        """The plan in force at `when`, or None when no stored plan covers it."""
        period = self.period_at(when)
        return period.plan if period else None

    def period_at(self, when: int) -> PlanPeriod | None:
        """The stored plan period in force at `when`, or None when none covers it."""
        current: PlanPeriod | None = None
        for period in self.plans:
            if period.effective_from <= when:
                current = period
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
    # (org, bucket) -> the plan the newest capability token among its events states, and when
    # that token was issued
    token_plans: dict[tuple[str, int], str] = {}
    token_issued: dict[tuple[str, int], int] = {}
    # (org, meter, bucket) -> `ledger_sums` per rounding chain (segment) holding it
    ledger_chains: dict[tuple[str, str, int], dict[str, int]] = {}


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
    billed: bool = False  # its bucket has a sent row: billed here, whole (when asked)


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
    audit: AuditEntry | None = None  # appended when the row moves (the sender's record)


class SeamRows(msgspec.Struct, frozen=True):
    reached: int  # sent, attempted or cancelled: the provider has (or had) them
    excluded_before_bill_from: int


class BilledRange(msgspec.Struct, frozen=True):
    """Consecutive buckets `[start, end)` of one org that the control plane bills: each has a
    ledger row in state `sent` (any meter) (see :meth:`SendStore.billed_ranges`)."""

    org_id: str
    start: int
    end: int


SeamReader = Callable[[int], Awaitable[SeamRows]]
"""What the ledger holds from a bucket start on (see :meth:`SendStore.seam`)."""

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


class ProviderError(msgspec.Struct, frozen=True):
    """One sampled error of a provider's error report: the meter event's identifier."""

    identifier: str
    code: str  # e.g. "meter_event_customer_not_found"
    message: str = ""


class HeldErrors(msgspec.Struct, frozen=True):
    """What recording an error report changed."""

    held: list[str]  # identifiers of the rows moved to held/provider_error
    unmatched: list[str]  # sampled identifiers that are no row the provider has from us
    flagged: list[str]  # orgs whose customer mapping was flagged


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
    plans: tuple[PlanPeriod, ...] = ()  # further plan periods, each upserted by its start


class MeterQuantity(msgspec.Struct, frozen=True):
    """Whole units of one meter one org has in the ledger for a period (money parity)."""

    org_id: str
    meter: str
    quantity: int


class MoneyRun(msgspec.Struct, frozen=True):
    """A stored money parity comparison of one billing period (amounts in minor units)."""

    period_start: int
    period_end: int
    checked_at: int
    currency: str
    tolerance: str  # the [parity] money_tolerance it was judged with
    orgs: int
    mismatches: int
    only_controlplane: int
    only_legacy: int
    stripe_findings: int  # orgs whose computed amount differs from Stripe's preview
    controlplane_minor: int
    legacy_minor: int | None  # None: no legacy invoices to compare with
    clean: bool
    id: int = 0


class MoneyOrgResult(msgspec.Struct, frozen=True):
    """One org of a stored money parity run (minor units; None: absent on that side)."""

    org_id: str
    controlplane_minor: int | None
    legacy_minor: int | None
    stripe_minor: int | None
    within_tolerance: bool


class Finding(msgspec.Struct, frozen=True):
    """One (org, customer, meter, hour) where the provider's aggregate and the units the ledger
    sent differ: `short` (the provider holds fewer: under billing) or `over` (more: double
    billing). `ledger` and `provider` are whole units; `hour` the timestamps' hour sent."""

    org_id: str
    customer: str
    meter: str
    hour: int
    ledger: int
    provider: int
    status: str  # "short" | "over"
    # what the ledger does about it (controlplane.reconcile): `held` (short: the rows the
    # provider lacks, now held as provider_missing), `found` (over: held or attempted rows the
    # provider holds after all, now sent), `cancel` (over: cancelled rows the provider still
    # holds, cancelled again by a repair), `credit_note` (over: past the cancel window), or
    # `unattributed` (no set of the hour's rows accounts for the units: for a person)
    remedy: str = "unattributed"
    rows: list[str] = []  # the identifiers of the rows the remedy moves


class SentCell(msgspec.Struct, frozen=True):
    """The units the ledger sent for one (org, customer, meter, hour of the timestamp sent)."""

    org_id: str
    customer: str
    meter: str
    hour: int
    units: int
    last_attempt_at: int | None = None  # the newest call made for the cell's rows


class RowMove(msgspec.Struct, frozen=True):
    """A ledger row moved by what the provider's books show, only from the state and reason
    it was read in (`expect_state`, `expect_reason`), with its audit record."""

    row_id: int
    expect_state: str
    expect_reason: str | None
    state: str
    reason: str | None
    detail: str
    audit: AuditEntry


class ReconcileRun(msgspec.Struct, frozen=True):
    """A stored reconciliation of the ledger's sent rows with the provider's aggregates over
    [start, end) (hours older than the settle period), with its findings."""

    checked_at: int
    start: int
    end: int
    org_id: str | None  # one org's, or every org's (None)
    customers: int  # (customer, meter) pairs read at the provider
    hours: int  # (org, customer, meter, hour) cells compared
    units_short: int
    units_over: int
    clean: bool
    findings: list[Finding]
    id: int = 0
