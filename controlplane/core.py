"""The control plane's core: plugins wired together, and the operations every shell calls.

The HTTP app, the CLI and the scheduler are thin shells over :class:`ControlPlane`; none of
them holds business logic of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
import structlog

from controlplane import audit, gauges, orgs, reconcile, registry, rollup
from controlplane.capabilities import Issued, Keys
from controlplane.config import Config, LegacyPluginConfig, backend_of
from controlplane.cutover import Cutover
from controlplane.errors import (
    BadValue,
    ConfigError,
    FlagRefused,
    InvalidInput,
    MigrationError,
    NoDatabase,
    NotFound,
    Problem,
)
from controlplane.events import Ingestor
from controlplane.flags import Authority, FlagChange, Snapshot, resolve, set_flags
from controlplane.flags.resolve import static_layers
from controlplane.flags.service import DEFAULT_MAX_EVENT_AGE_SECONDS, record_static
from controlplane.flags.service import check as check_flags
from controlplane.handback import HandBack
from controlplane.interfaces import (
    AuditEntry,
    AuditRecord,
    Billing,
    CatalogPublisher,
    CatalogVersion,
    ClosedPeriod,
    IngestResult,
    IngestSource,
    InvoicePreviewer,
    JobRun,
    LedgerCount,
    LegacyCapability,
    LegacyError,
    LegacySource,
    MeterSummaries,
    MigrationStatus,
    Org,
    OrgDrift,
    ParityRun,
    PluginConfig,
    PublishResult,
    Storage,
    TrueUp,
    UsageTotal,
    WebhookResult,
)
from controlplane.ledger import LedgerRow, RowState
from controlplane.meters import MeterSet
from controlplane.metrics import Metrics
from controlplane.money import configured_catalog
from controlplane.money_parity import MoneyParity
from controlplane.orgs import OrgUpdate
from controlplane.parity import (
    CleanSince,
    Comparison,
    Policy,
    clean_since,
    compare,
    window_problems,
)
from controlplane.parity_checker import CheckerStats, ParityChecker, policy_of
from controlplane.plans import FREE, PRO, Plans
from controlplane.provider_errors import Released, release_provider_errors
from controlplane.rollup import LegacyPlans
from controlplane.sender import Sender, SendStats

log = structlog.get_logger("core")
T = TypeVar("T")
LEGACY_PLAN_LOOKUPS = 8  # legacy plan questions in flight at once


def _plugin(kind: str, section: PluginConfig) -> Any:
    """The plugin of `kind` that a config section selects, built from that section."""
    return registry.spec_for(kind, backend_of(section)).factory(section)


class ControlPlane:
    """Storage, billing, meters and flags for one config. Use as an async context manager."""

    def __init__(
        self,
        config: Config,
        *,
        storage: Storage | None = None,
        billing: Billing | None = None,
        legacy: LegacySource | None = None,
        clock: Callable[[], float] = time.time,
        migrate: bool = True,
        create: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock
        self.meters = MeterSet(config.meters, config.rollup.bucket_seconds)
        self.static_flags = static_layers(config.flags)
        try:
            check_flags(resolve(self.static_flags, {}), config.rollup.bucket_seconds)
        except FlagRefused as exc:
            raise ConfigError(
                f"flags (config file or environment) refused by rule {exc.message}"
            ) from exc
        self.storage: Storage = storage or _plugin("storage", config.storage)
        self.audit_keys = audit.keys(config.audit)
        self.storage.sign = self.audit_keys.sign if self.audit_keys else None
        if billing is None and config.billing is not None:
            billing = _plugin("billing", config.billing)
        self.billing = billing
        if legacy is None and config.legacy is not None:
            legacy = _plugin("legacy", config.legacy)
        self.legacy = legacy
        self.metrics = Metrics()  # this plane's own Prometheus registry
        self.capability_keys = Keys(config.capabilities)
        self.ingestor = Ingestor(
            self.storage,
            self.meters,
            config.rollup.bucket_seconds,
            config.server.max_batch_events,
            earliest=config.server.event_time_min,
            max_ahead_seconds=config.server.event_time_max_ahead_seconds,
            unknown_types=config.events.unknown_types,
            clock=clock,
            tokens=self.capability_keys if config.capabilities.keys else None,
            required_for=config.capabilities.required_for,
            enforcing=self._enforcing,
            on_untokened=self.metrics.untokened,
        )
        self._migrate = migrate and create
        self._create = create  # false: read an existing database only (NoDatabase otherwise)
        self.ingest_sources: list[IngestSource] = []  # started by `serve` (start_ingest)
        # org -> (the legacy biller's plan or None, when asked): see _legacy_plans
        self._legacy_plan_cache: dict[str, tuple[str | None, float]] = {}
        self._stack = contextlib.AsyncExitStack()
        self.plans = Plans(
            config.plans,
            config.legacy.plan_map if isinstance(config.legacy, LegacyPluginConfig) else None,
        )

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        try:
            await self.storage.start(create=self._create)
            self._stack.push_async_callback(self.storage.close)
            if self._migrate:
                applied = await self.storage.migrate()
                if applied:
                    log.info("storage.migrated", applied=applied)
            status = await self.storage.migration_status()
            if not status.applied and not self._create:
                raise NoDatabase(f"no control plane database at {self.config.storage_where}")
            if not status.current:
                raise MigrationError(
                    f"pending migrations {status.pending}: run `controlplane migrate`"
                )
            await self.storage.pin_setting("bucket_seconds", str(self.config.rollup.bucket_seconds))
            await self._record_static_flags()
            if self.billing is not None:
                await self.billing.start()
                self._stack.push_async_callback(self.billing.close)
            if self.legacy is not None:
                await self.legacy.start()
                self._stack.push_async_callback(self.legacy.close)
        except BaseException:
            await self._stack.aclose()
            raise

    async def close(self) -> None:
        await self._stack.aclose()

    @staticmethod
    async def migrate_storage(config: Config) -> tuple[list[str], MigrationStatus]:
        """Apply pending schema migrations with the configured storage alone (no billing, no
        flag checks, nothing else started): the migrations applied now, and the status after."""
        storage: Storage = _plugin("storage", config.storage)
        await storage.start()
        try:
            applied = await storage.migrate()
            return applied, await storage.migration_status()
        finally:
            await storage.close()

    async def _record_static_flags(self) -> None:
        """A change of `[flags]` or the environment since the last start keeps the same rules
        as a runtime change, and is audited: refused, the control plane does not start."""
        try:
            await record_static(
                self.storage,
                self.static_flags,
                bucket_seconds=self.config.rollup.bucket_seconds,
                at=self.now(),
                max_age_seconds=self.max_event_age_seconds(),
            )
        except FlagRefused as exc:
            layers = sorted(
                {
                    f"{v.source} ({name})"
                    for name, v in self.static_flags.items()
                    if v.source != "default"
                }
            )
            raise ConfigError(
                "flags: the config file or environment changed the flags since the last start "
                f"({', '.join(layers) or 'back to defaults'}), refused by rule {exc.message}. "
                "Undo that change and make it at runtime (`controlplane flags set`, "
                "`controlplane cutover ...`), where it can be forced with a reason"
            ) from exc

    def now(self) -> int:
        return int(self.clock())

    # ingest and reads ---------------------------------------------------------------------

    async def ingest(self, items: Sequence[Any], source: str) -> IngestResult:
        try:
            result = await self.ingestor.ingest(items, source)
        except InvalidInput:
            self.metrics.rejected(source, len(items))
            raise
        self.metrics.ingested(source, result)
        return result

    async def _enforcing(self) -> bool:
        """Whether `[capabilities] required_for` is enforced now: once the control plane is
        the billing authority."""
        return (await self.flags()).authority is Authority.CONTROLPLANE

    async def start_ingest(self) -> list[IngestSource]:
        """Start every `[[ingest]]` source with :meth:`ingest` as its sink (`serve` does; a
        one-shot command does not). Each is closed with the control plane, before storage."""
        sources: list[IngestSource] = []
        for i, section in enumerate(self.config.ingest):
            source = _plugin("ingest", section)
            try:
                await source.start(self.ingest)
            except ConfigError as exc:  # the plugin names `ingest.<key>`; say which entry
                raise ConfigError(str(exc).replace("ingest.", f"ingest[{i}].", 1)) from None
            self._stack.push_async_callback(source.close)
            sources.append(source)
        self.ingest_sources = sources
        return sources

    async def flags(self) -> Snapshot:
        return resolve(self.static_flags, await self.storage.runtime_flags())

    async def set_flags(
        self,
        changes: Sequence[FlagChange],
        *,
        actor: str,
        reason: str,
        force: bool = False,
        via: str | None = None,
        group_id: str | None = None,
        extra_audit: Sequence[AuditEntry] = (),
    ) -> Snapshot:
        return await set_flags(
            self.storage,
            self.static_flags,
            changes,
            actor=actor,
            reason=reason,
            bucket_seconds=self.config.rollup.bucket_seconds,
            at=self.now(),
            force=force,
            max_age_seconds=self.max_event_age_seconds(),
            via=via,
            group_id=group_id,
            extra_audit=extra_audit,
        )

    def max_event_age_seconds(self) -> int:
        """The oldest event the billing provider accepts, relative to now (default 35 days)."""
        age = self.billing.max_event_age_seconds if self.billing is not None else None
        return DEFAULT_MAX_EVENT_AGE_SECONDS if age is None else age

    async def set_org(
        self,
        org_id: str,
        *,
        customer: str | None,
        plan: str | None,
        actor: str,
        effective_from: int | None = None,
        reason: str | None = None,
        force: bool = False,
    ) -> OrgUpdate:
        """Set the org's provider customer and/or start a plan period, audited
        (:func:`controlplane.orgs.set_org`)."""
        return await orgs.set_org(
            self.storage,
            self.storage,
            self.plans,
            org_id,
            customer=customer,
            plan=plan,
            actor=actor,
            at=self.now(),
            effective_from=effective_from,
            reason=reason,
            force=force,
        )

    # reads: what the shells show ----------------------------------------------------------

    async def storage_status(self) -> MigrationStatus:
        """Reach storage and answer its migration status; raises when storage cannot answer."""
        await self.storage.ping()
        return await self.storage.migration_status()

    async def usage(
        self,
        org_id: str | None = None,
        meter: str | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> list[UsageTotal]:
        """Per-bucket usage totals computed from stored events, open buckets included."""
        return await self.storage.usage(org_id, meter, start, end)

    async def ledger(
        self,
        *,
        org_id: str | None = None,
        state: RowState | None = None,
        start: int | None = None,
        end: int | None = None,
        limit: int = 1000,
    ) -> list[LedgerRow]:
        """Ledger rows of buckets in [start, end), at most `limit`."""
        return await self.storage.ledger(
            org_id=org_id, state=state, start=start, end=end, limit=limit
        )

    async def release_provider_errors(self, org_id: str, *, actor: str, reason: str) -> Released:
        """Re-issue the org's rows held for a provider error under new identifiers (see
        :mod:`controlplane.provider_errors`); audited."""
        return await release_provider_errors(
            self.storage, org_id, at=self.now(), actor=actor, reason=reason
        )

    async def org(self, org_id: str) -> Org | None:
        """The org's customer, plans and subscription; None when it was never set."""
        return await self.storage.get_org(org_id)

    async def audit_entries(self, action_prefix: str, limit: int = 100) -> list[AuditRecord]:
        """Audit records whose action starts with `action_prefix`, newest first."""
        return await self.storage.audit_log(action_prefix=action_prefix, limit=limit)

    async def job_runs(self, job: str | None = None, limit: int = 50) -> list[JobRun]:
        """Recorded passes of the scheduled jobs (of `job` alone, if given), newest first."""
        return await self.storage.job_runs(job, limit)

    async def ledger_counts(self) -> list[LedgerCount]:
        """Ledger rows per (state, reason); pairs without rows are absent."""
        return await self.storage.ledger_counts()

    async def catalog(self, version: int | None = None) -> CatalogVersion | None:
        """A published catalog version; the newest when `version` is None."""
        return await self.storage.catalog_version(version)

    async def plan_now(self, org_id: str) -> str:
        """The org's plan now: its stored plan, else the legacy biller's (mapped through
        ``[legacy] plan_map``; an answer it does not map is refused), else `free`."""
        org = await self.storage.get_org(org_id)
        stored = org.plan_at(self.now()) if org else None
        if stored is not None:
            return stored
        legacy = self.legacy
        if legacy is None or LegacyCapability.PLAN not in legacy.capabilities():
            return FREE
        answer = await legacy.plan(org_id)
        if answer is None:
            return FREE
        plan = self.plans.from_legacy(answer)
        if plan is None:
            raise BadValue(
                [
                    Problem(
                        field="plan",
                        message=f"the legacy biller's plan {answer!r} maps to no configured "
                        "plan: add it to [legacy] plan_map, or set the org's plan",
                    )
                ]
            )
        return plan

    async def issue_capability(self, org_id: str, *, actor: str) -> Issued:
        """A signed capability token stating the org's plan now and its entitlements
        (:mod:`controlplane.capabilities`); audited by digest, never by token. NotFound when
        no signing key is configured."""
        if not self.config.capabilities.keys:
            raise NotFound("capability tokens are not configured: no [[capabilities.keys]]")
        plan = await self.plan_now(org_id)
        issued = self.capability_keys.issue(org_id, plan, self.plans.entitlements(plan), self.now())
        entry = AuditEntry(
            action="capability.issued",
            subject=org_id,
            actor=actor,
            after={
                "plan": plan,
                "kid": issued.kid,
                "expires_at": issued.expires_at,
                "digest": issued.digest,
            },
        )
        await self.storage.append_audit([entry], self.now())
        return issued

    # jobs ---------------------------------------------------------------------------------

    async def rollup(
        self, *, until: int | None = None, org_id: str | None = None, wait: bool = True
    ) -> rollup.RollupStats:
        """Roll up closed dirty buckets; `until` overrides the watermark (ignores grace).

        One process at a time among those sharing the store: without `wait`, a pass finding
        another one running is skipped (the scheduled job on replicas)."""
        closed_before = (
            until
            if until is not None
            else rollup.watermark(self.clock(), self.config.rollup.grace_seconds)
        )
        async with self.storage.exclusive("rollup", wait=wait) as mine:
            if not mine:
                return rollup.RollupStats(skipped="another process is rolling up")
            # gauge usage first: the buckets it marks dirty are then folded like any other
            derived = await gauges.run(
                self.storage,
                self.meters.gauges,
                bucket_seconds=self.config.rollup.bucket_seconds,
                closed_before=closed_before,
                org_id=org_id,
            )
            self.metrics.gauge_resets.inc(derived.resets)
            legacy = await self._legacy_plans(closed_before, org_id)
            stats = await rollup.run(
                self.storage,
                bucket_seconds=self.config.rollup.bucket_seconds,
                closed_before=closed_before,
                batch_buckets=self.config.rollup.batch_buckets,
                org_id=org_id,
                legacy=legacy,
                plans=self.plans,
            )
            stats.gauge_series, stats.gauge_resets = derived.series, derived.resets
            self.metrics.unplanned_rows.inc(stats.unplanned)
            return stats

    async def _legacy_plans(self, closed_before: int, org_id: str | None) -> LegacyPlans | None:
        """The legacy biller's plan for each org the rollup is about to bill without a stored
        plan (DESIGN §8: stored plan, then the legacy biller's answer, then `free`), and the
        orgs it could not answer for: their buckets wait for a later pass, never billed as
        `free` by guess. Answers are reused for `[rollup] legacy_plan_seconds`."""
        legacy = self.legacy
        if legacy is None or LegacyCapability.PLAN not in legacy.capabilities():
            return None
        orgs = await self.storage.unplanned_orgs(closed_before, self.config.rollup.bucket_seconds)
        if org_id is not None:
            orgs = [o for o in orgs if o == org_id]
        now = time.monotonic()
        fresh_for = self.config.rollup.legacy_plan_seconds
        cache = self._legacy_plan_cache
        stale = [o for o in orgs if o not in cache or now - cache[o][1] >= fresh_for]
        slots = asyncio.Semaphore(LEGACY_PLAN_LOOKUPS)
        deferred: list[str] = []

        async def ask(org: str) -> None:
            async with slots:
                try:
                    cache[org] = (await legacy.plan(org), now)
                except LegacyError as exc:
                    if org in cache:  # an older answer still stands
                        log.warning("rollup.plan_stale", org=org, error=str(exc))
                    else:
                        deferred.append(org)
                        log.warning("rollup.plan_unknown", org=org, error=str(exc))

        await asyncio.gather(*(ask(org) for org in stale))
        answered = [org for org in orgs if org in cache]
        plans = {org: plan for org in answered if (plan := cache[org][0])}
        return LegacyPlans(plans=plans, answered=answered, deferred=deferred)

    def sender(self) -> Sender:
        if self.billing is None:
            raise ConfigError("billing: no billing backend is configured; add a [billing] section")
        s = self.config.sender
        return Sender(
            self.storage,
            self.billing,
            self.meters,
            batch_size=s.batch_size,
            concurrency=s.concurrency,
            ambiguous_after_seconds=s.ambiguous_after_seconds,
            claim_seconds=s.claim_seconds,
            observe=self.metrics.sent,
        )

    async def send(self, *, org_id: str | None = None, until: int | None = None) -> SendStats:
        flags = await self.flags()
        if self.billing is None:
            return SendStats(skipped="no billing backend configured")
        return await self.sender().run(
            flags, clock=self.clock, org_id=org_id, until=until, recheck=self.flags
        )

    async def verify_audit(
        self,
        progress: Callable[[int], None] | None = None,
        page: int = 5000,
        signed_from: int | None = None,
    ) -> tuple[int, audit.Break | None]:
        """Walk the whole audit chain, oldest first: (records that hold, the first break).

        With `[audit]` keys, every record from `signed_from` (else the first record) must also
        carry a valid signature. When an unsigned record breaks the chain, the answer names
        the first signed record: where signing probably began, for the operator to confirm."""
        verifier = audit.Verifier(self.audit_keys, signed_from)
        after = 0
        while records := await self.storage.audit_chain(after, page):
            for record in records:
                broken = verifier.feed(record)
                if broken is not None:
                    if broken.reason == audit.UNSIGNED and signed_from is None:
                        broken = await self._first_signed_hint(broken)
                    return verifier.checked, broken
            after = records[-1].id
            if progress is not None:
                progress(verifier.checked)
        return verifier.checked, None

    async def _first_signed_hint(self, broken: audit.Break, page: int = 5000) -> audit.Break:
        after = broken.id
        while records := await self.storage.audit_chain(after, page):
            for record in records:
                if record.signature:
                    return audit.Break(
                        broken.id,
                        f"{audit.UNSIGNED}; the first signed record is {record.id}: if the "
                        "records before it were written before [audit] key was set, verify "
                        f"with --signed-from {record.id} ([audit] signed_from)",
                    )
            after = records[-1].id
        return broken

    async def record(self, job: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run one job pass and record it (start, end, outcome, counts)."""
        started = time.time()
        try:
            result = await work()
        except Exception as exc:
            await self.storage.record_job_run(
                JobRun(
                    job=job,
                    started_at=started,
                    ended_at=time.time(),
                    outcome="error",
                    error=f"{type(exc).__name__}: {exc}",
                )
            )
            log.error("job.failed", job=job, error=str(exc))
            raise
        counts = (
            {k: v for k, v in msgspec.structs.asdict(result).items() if isinstance(v, int)}
            if isinstance(result, msgspec.Struct)
            else {}
        )
        skipped = getattr(result, "skipped", None)
        await self.storage.record_job_run(
            JobRun(
                job=job,
                started_at=started,
                ended_at=time.time(),
                outcome="skipped" if skipped else "ok",
                counts=counts,
                error=skipped,
            )
        )
        return result

    # parity -------------------------------------------------------------------------------

    def parity_policy(self) -> Policy:
        return policy_of(self.config.parity.alert)

    def _parity_meter(self) -> str:
        meter = self.config.parity.meter
        if meter not in self.meters.by_name:
            raise ConfigError(
                f"parity.meter: no meter named {meter!r}; known: {sorted(self.meters.by_name)}"
            )
        return meter

    async def parity(self, start: int, end: int) -> Comparison:
        """Compare the control plane's usage of the parity meter (from events) with the
        legacy biller's, per org, for buckets in [start, end) (bucket-aligned)."""
        problems = window_problems(start, end, self.config.rollup.bucket_seconds)
        if problems:
            raise InvalidInput(problems)
        meter = self._parity_meter()
        if self.legacy is None:
            ours = await self.storage.usage_by_org(meter, start, end)
            theirs = None
        else:
            ours, theirs = await asyncio.gather(
                self.storage.usage_by_org(meter, start, end), self.legacy.usage(start, end)
            )
        return compare(
            meter, start, end, ours, theirs, self.config.parity.tolerance, self.parity_policy()
        )

    async def parity_check(self) -> CheckerStats:
        """One pass of the scheduled checker (see :mod:`controlplane.parity_checker`)."""
        checker = ParityChecker(
            storage=self.storage,
            config=self.config.parity,
            bucket_seconds=self.config.rollup.bucket_seconds,
            grace_seconds=self.config.rollup.grace_seconds,
            compare=self.parity,
            clock=self.now,
            has_legacy=self.legacy is not None,
        )
        return await checker.run()

    @property
    def cutover(self) -> Cutover:
        """The cutover steps (plan, preflight, execute, rollback, status) over this plane."""
        return Cutover(
            config=self.config,
            storage=self.storage,
            legacy=self.legacy,
            billing=self.billing,
            meters=self.meters,
            plans=self.plans,
            now=self.now,
            max_event_age_seconds=self.max_event_age_seconds,
            flags=self.flags,
            set_flags=self.set_flags,
            parity_clean_since=self.parity_clean_since,
            money_parity_clean=self.money_parity.last_closed,
            hand_back=lambda actor, create: self.hand_back.run(actor, create_credit_notes=create),
        )

    @property
    def hand_back(self) -> HandBack:
        """What a rollback hands back to the legacy biller (:mod:`controlplane.handback`)."""
        return HandBack(self.storage, self.billing, self.meters, self.config, self.now)

    async def parity_runs(
        self, *, limit: int = 100, start: int | None = None, end: int | None = None
    ) -> list[ParityRun]:
        """The checker's runs of the parity meter with bucket_start in [start, end), newest
        bucket first."""
        return await self.storage.parity_runs(
            self.config.parity.meter, limit=limit, start=start, end=end
        )

    async def parity_run(self, run_id: int) -> tuple[ParityRun, list[OrgDrift]] | None:
        """One stored run of the checker and the orgs that did not match."""
        return await self.storage.parity_run(run_id)

    async def parity_clean_since(self) -> CleanSince:
        """Since when the checker has found parity clean without a break, up to the newest
        checked bucket (for cutover preflight)."""
        meter = self.config.parity.meter
        newest = await self.storage.parity_runs(meter, limit=1)
        tail = await self.storage.parity_clean_tail(meter)
        return clean_since(
            tail, newest[0].bucket_start if newest else None, self.config.rollup.bucket_seconds
        )

    # money parity -------------------------------------------------------------------------

    @property
    def money_parity(self) -> MoneyParity:
        """Money parity over this plane: the ledger priced with the catalog, against the legacy
        biller's invoices and Stripe's previews (see :mod:`controlplane.money_parity`)."""
        return MoneyParity(
            storage=self.storage,
            legacy=self.legacy,
            previewer=self.billing if isinstance(self.billing, InvoicePreviewer) else None,
            configured_catalog=configured_catalog(self.config.catalog),
            tolerance=self.config.parity.money_tolerance,
            clock=self.now,
        )

    # reconciliation ---------------------------------------------------------------------

    @property
    def reconciles(self) -> bool:
        """Whether the billing plugin reads the provider's aggregates (reconciliation)."""
        return isinstance(self.billing, MeterSummaries)

    @property
    def reconciler(self) -> reconcile.Reconciler:
        """Reconciliation runs, the scheduled pass and repairs (:mod:`controlplane.reconcile`)."""
        return reconcile.Reconciler(
            self.storage, self.billing, self.config, now=self.now, count=self.metrics.reconciled
        )

    # catalog and webhooks -----------------------------------------------------------------

    async def catalog_publish(self, *, actor: str, dry_run: bool = False) -> PublishResult:
        """Make the provider match `[catalog]` and store the resolved ids as a new version,
        through the billing plugin's CatalogPublisher capability (Stripe's:
        :mod:`controlplane.plugins.billing.stripe.catalog`). Returns a PublishResult."""
        catalog = self.config.catalog
        if not catalog.prices:
            raise ConfigError("catalog: no prices configured; an empty catalog is never published")
        if not isinstance(self.billing, CatalogPublisher):
            raise ConfigError('billing: the catalog and webhooks need [billing] backend = "stripe"')
        return await self.billing.publish_catalog(
            self.storage, catalog, self.config.meters, actor=actor, dry_run=dry_run, now=self.now
        )

    async def stripe_webhook(self, body: bytes, signature: str | None) -> WebhookResult:
        """Verify and process one Stripe webhook delivery (see
        :mod:`controlplane.plugins.billing.stripe.webhooks`), configured by `[stripe]` whatever
        the billing plugin. Returns a WebhookResult; raises WebhookRejected for a bad
        signature."""
        from controlplane.invoices import reissue_late
        from controlplane.plugins.billing.stripe.webhooks import ACTOR, StripeWebhooks

        async def true_up(org_id: str, until: int) -> TrueUp:
            rolled = await self.rollup(until=until, org_id=org_id)
            sent = await self.send(org_id=org_id, until=until)
            return TrueUp(rolled.rows, sent.sent, sent.retry + sent.ambiguous, sent.skipped)

        async def reissue(period: ClosedPeriod) -> object:
            return await reissue_late(
                self.storage, self.billing, self.meters, period, at=self.now(), actor=ACTOR
            )

        receiver = StripeWebhooks(
            storage=self.storage,
            settings=self.config.stripe,
            billing=self.billing,
            now=self.now,
            alerts_delivered=self.config.parity.alert.webhook_url is not None,
            true_up=true_up,
            reissue=reissue,
            pro_prices=self.plans.prices(PRO),
        )
        return await receiver.receive(body, signature)

    async def stripe_thin_event(self, body: bytes, signature: str | None) -> WebhookResult:
        """Verify and process one thin-event delivery from a Stripe event destination (see
        :mod:`controlplane.plugins.billing.stripe.thin_events`): meter-event error reports
        hold the sampled rows. Raises WebhookRejected for a bad signature."""
        from controlplane.plugins.billing.stripe.thin_events import StripeThinEvents

        receiver = StripeThinEvents(
            storage=self.storage,
            settings=self.config.stripe,
            billing=self.billing,
            now=self.now,
            alerts_delivered=self.config.parity.alert.webhook_url is not None,
            count_errors=self.metrics.provider_error,
        )
        return await receiver.receive(body, signature)
