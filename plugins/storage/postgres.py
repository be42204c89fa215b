"""PostgreSQL storage: the path past one machine. Any number of replicas share one database.

    [storage]
    backend = "postgres"
    dsn = { env = "CONTROLPLANE_DSN" }   # postgresql://user:password@host:5432/controlplane

What keeps replicas safe (DESIGN §11):

- ingest runs anywhere: `ON CONFLICT DO NOTHING` makes concurrent duplicates wait and skip, and
  each batch renews the dirty mark of every (org, bucket) it touched in the same transaction;
  rollup clears a mark only if it is still the one it read, so an event committed while a
  rollup runs is never forgotten (marks, not an id cursor, are what rollup trusts);
- the scheduled rollup runs on one replica at a time (a session advisory lock, `exclusive`),
  and every transaction that rewrites a rounding chain (a rollup step, a settle with
  exclusions) holds a transaction advisory lock, so chains and carries never interleave;
- senders claim rows with `FOR UPDATE SKIP LOCKED`, one claim transaction at a time, and never
  two senders on the same (org, meter); a dead replica's claims lapse at their expiry;
- audited writes append to the hash chain under one transaction advisory lock, so the chain
  never forks.

Driver errors become :class:`StorageError`. Transient ones (serialization failures,
deadlocks, a server not accepting connections yet) are retried with backoff; a connection
lost mid-transaction is not (the outcome is unknown), the caller's next pass takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import structlog

from controlplane import audit as audit_chain
from controlplane import migrations, sql
from controlplane.errors import ConfigError, MigrationError, StorageError
from controlplane.events import bucket_of
from controlplane.interfaces import (
    Attempt,
    AuditEntry,
    AuditRecord,
    Carry,
    CatalogVersion,
    Claim,
    ClosedPeriod,
    DirtyBacklog,
    FlagGuard,
    FlagWrite,
    IngestResult,
    JobRun,
    LedgerCount,
    MigrationStatus,
    Org,
    OrgChange,
    OrgDrift,
    ParityAlert,
    ParityRun,
    PlanPeriod,
    PluginConfig,
    RollupBatch,
    RollupPlanner,
    RuntimeFlag,
    SeamRows,
    SendItem,
    Settlement,
    StaticFlags,
    Storage,
    StoredEvent,
    UsageTotal,
    WebhookRecord,
)
from controlplane.ledger import LedgerRow, NewRow, Reason, RowState
from controlplane.plugins.storage._common import (
    STATIC_FLAGS,
    Reissue,
    audit_record,
    bucket_sums,
    chains,
    check_batch_alone,
    check_bucket_bound,
    check_customer_free,
    check_flag_versions,
    check_flags_unchanged,
    check_static,
    ledger_row,
    orgs_with_plans,
    parity_run,
)
from controlplane.registry import PluginSpec, require
from controlplane.rollup import carry, requantify
from controlplane.secrets import Secret, check_url, reveal

Q = sql.load(__package__ or "", "postgres.sql")
T = TypeVar("T")
Conn = Any  # asyncpg.Connection: asyncpg ships no type hints
log = structlog.get_logger("storage.postgres")
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def _lock_key(name: str) -> int:
    """A stable advisory lock key per name (signed 64-bit, as PostgreSQL wants)."""
    return zlib.crc32(f"controlplane:{name}".encode()) - 2**31


CHAIN_LOCK = _lock_key("rounding-chains")
CLAIM_LOCK = _lock_key("sender-claims")
AUDIT_LOCK = _lock_key("audit-chain")
MIGRATE_LOCK = _lock_key("migrate")
FLAGS_LOCK = _lock_key("flags")


async def _seam(conn: Conn, bucket_start: int) -> SeamRows:
    ((reached, excluded),) = await conn.fetch(Q["seam"], bucket_start)
    return SeamRows(reached=int(reached), excluded_before_bill_from=int(excluded))


async def _flag_versions(conn: Conn) -> dict[str, int]:
    return {name: version for name, version in await conn.fetch(Q["flag_versions"])}


class PostgresStorageConfig(PluginConfig, tag="postgres", tag_field="backend", frozen=True):
    dsn: Secret = "postgresql://localhost/controlplane"
    min_connections: int = 2
    max_connections: int = 10
    command_timeout_seconds: float = 60.0
    retries: int = 5  # attempts for a transaction that failed transiently


class PostgresStorage(Storage):
    name = "postgres"

    def __init__(self, config: PostgresStorageConfig) -> None:
        self.config = config
        self._pg: Any = None
        self._pool: Any = None
        self._transient: tuple[type[BaseException], ...] = ()
        self._errors: tuple[type[BaseException], ...] = ()

    # lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.min_connections < 1 or self.config.max_connections < 2:
            raise ConfigError("storage.max_connections: at least 2 (one holds job locks)")
        pg = self._pg = require("asyncpg", "postgres", "postgres")
        self._transient = (
            pg.exceptions.SerializationError,
            pg.exceptions.DeadlockDetectedError,
            pg.exceptions.CannotConnectNowError,
            pg.exceptions.TooManyConnectionsError,
            ConnectionRefusedError,
        )
        self._errors = (pg.PostgresError, pg.InterfaceError, OSError, asyncio.TimeoutError)
        dsn = reveal(self.config.dsn, "storage.dsn")
        check_url(dsn, "storage.dsn")
        for attempt in range(1, self.config.retries + 1):
            try:
                self._pool = await pg.create_pool(
                    dsn,
                    min_size=self.config.min_connections,
                    max_size=self.config.max_connections,
                    command_timeout=self.config.command_timeout_seconds,
                )
                return
            except self._transient as exc:
                if attempt == self.config.retries:
                    raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
                await _backoff(attempt)
            except self._errors as exc:
                # the DSN may hold a password: name the failure, never the DSN
                raise StorageError(
                    f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}"
                ) from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), timeout=10)

    def _p(self) -> Any:
        if self._pool is None:
            raise StorageError("storage is not started")
        return self._pool

    async def _tx(self, what: str, work: Callable[[Conn], Awaitable[T]], *locks: int) -> T:
        """Run `work` in one transaction (after taking `locks`, transaction advisory locks,
        in order), retrying transient failures; every driver error becomes StorageError."""

        async def in_transaction(conn: Conn) -> T:
            async with conn.transaction():
                for key in locks:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
                return await work(conn)

        return await self._run(what, in_transaction)

    async def _run(self, what: str, work: Callable[[Conn], Awaitable[T]]) -> T:
        """`work` on a pooled connection, retrying transient failures."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._p().acquire() as conn:
                    return await work(conn)
            except self._transient as exc:
                if attempt >= self.config.retries:
                    raise StorageError(f"{what} failed {attempt} times: {exc}") from exc
                log.info("storage.retry", what=what, attempt=attempt, error=type(exc).__name__)
                await _backoff(attempt)
            except self._errors as exc:
                raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    async def _all(self, query: str, *args: Any) -> list[Any]:
        """One read statement: no transaction around it (one round trip, not three)."""

        async def read(conn: Conn) -> list[Any]:
            return list(await conn.fetch(query, *args))

        return await self._run("read", read)

    # schema -------------------------------------------------------------------------------

    async def _applied(self, conn: Conn) -> dict[str, str]:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, checksum text NOT NULL, applied_at bigint NOT NULL)"
        )
        return {
            r[0]: r[1] for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")
        }

    async def migrate(self) -> list[str]:
        """Apply pending migrations, each in its own transaction; replicas starting together
        wait for each other (a session advisory lock) instead of racing."""
        known = migrations.available("postgres")
        done: list[str] = []
        try:
            async with self._p().acquire() as conn:
                await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
                try:
                    for migration in migrations.pending(known, await self._applied(conn)):
                        try:
                            async with conn.transaction():
                                await conn.execute(migration.sql)
                                await conn.execute(
                                    "INSERT INTO schema_migrations (name, checksum, applied_at)"
                                    " VALUES ($1, $2, $3)",
                                    migration.name,
                                    migration.checksum,
                                    int(time.time()),
                                )
                        except self._pg.PostgresError as exc:
                            raise MigrationError(
                                f"migration {migration.name} failed: {exc}"
                            ) from exc
                        done.append(migration.name)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
        except self._errors as exc:
            raise StorageError(f"migrate failed: {exc}") from exc
        return done

    async def migration_status(self) -> MigrationStatus:
        known = migrations.available("postgres")
        applied = await self._tx("migration status", self._applied)
        todo = migrations.pending(known, applied)
        return MigrationStatus(applied=sorted(applied), pending=[m.name for m in todo])

    async def ping(self) -> None:
        await self._all("SELECT 1")

    async def pin_setting(self, key: str, value: str) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(Q["put_setting"], key, value)
            pinned = await conn.fetchval(Q["get_setting"], key)
            if pinned != value:
                raise ConfigError(
                    f"rollup.{key}: the data was written with {key} = {pinned}; "
                    f"it cannot change to {value}"
                )

        await self._tx("pin setting", work)

    @contextlib.asynccontextmanager
    async def exclusive(self, job: str, *, wait: bool = False) -> AsyncIterator[bool]:
        key = _lock_key(f"job:{job}")
        try:
            conn = await self._p().acquire()
        except self._errors as exc:
            raise StorageError(f"cannot take the {job} lock: {exc}") from exc
        try:
            if wait:
                await conn.execute("SELECT pg_advisory_lock($1)", key)
                held = True
            else:
                held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield held
            finally:
                if held:
                    with contextlib.suppress(Exception):
                        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await self._p().release(conn)

    # ingest -------------------------------------------------------------------------------

    async def insert_events(
        self, events: Sequence[StoredEvent], bucket_seconds: int
    ) -> IngestResult:
        unique: dict[tuple[str, str], StoredEvent] = {}
        for e in events:
            unique.setdefault((e.source, e.event_id), e)
        batch = list(unique.values())
        columns = (
            [e.source for e in batch],
            [e.event_id for e in batch],
            [e.type for e in batch],
            [e.org_id for e in batch],
            [e.time_ms for e in batch],
            [e.data.decode() for e in batch],
        )

        async def work(conn: Conn) -> int:
            stored = await conn.fetch(Q["insert_events"], *columns, int(time.time()))
            if not stored:
                return 0
            pks = {(r[1], r[2]): r[0] for r in stored}
            values: list[tuple[int, str, str, int, int]] = []
            dirty: set[tuple[str, int]] = set()
            fresh = [e for e in batch if (e.source, e.event_id) in pks]
            check_batch_alone(fresh, bucket_seconds)
            added = bucket_sums(fresh, bucket_seconds)
            for e in fresh:
                pk = pks[(e.source, e.event_id)]
                bucket = bucket_of(e.time_ms, bucket_seconds)
                dirty.add((e.org_id, bucket))
                values.extend((pk, meter, e.org_id, bucket, micros) for meter, micros in e.values)
            if values:
                pk_col, meter_col, org_col, bucket_col, micros_col = zip(*values, strict=True)
                await conn.execute(
                    Q["insert_meter_values"], pk_col, meter_col, org_col, bucket_col, micros_col
                )
                totals = await conn.fetch(
                    Q["add_bucket_totals"], org_col, bucket_col, meter_col, micros_col
                )
                # refused whole when a total passed the bound on the way: the transaction
                # rolls back
                before = {(o, m, b): t - added[(o, m, b)] for o, b, m, t in totals}
                check_bucket_bound(fresh, bucket_seconds, before)
            marks = sorted(dirty)
            await conn.execute(Q["mark_dirty"], [o for o, _ in marks], [b for _, b in marks])
            return len(stored)

        accepted = await self._tx("ingest", work) if batch else 0
        return IngestResult(accepted=accepted, duplicates=len(events) - accepted)

    async def usage(
        self, org_id: str | None, meter: str | None, start: int | None, end: int | None
    ) -> list[UsageTotal]:
        rows = await self._all(Q["usage"], org_id, meter, start, end)
        return [UsageTotal(*r) for r in rows]

    # rollup -------------------------------------------------------------------------------

    async def rollup_step(
        self,
        closed_before: int,
        bucket_seconds: int,
        limit: int,
        planner: RollupPlanner,
        org_id: str | None = None,
        unplanned_allowed: Sequence[str] | None = None,
    ) -> tuple[int, list[NewRow]]:
        last_start = closed_before - bucket_seconds
        now = int(time.time())

        async def work(conn: Conn) -> tuple[int, list[NewRow]]:
            allowed = None if unplanned_allowed is None else list(unplanned_allowed)
            dirty = await conn.fetch(Q["closed_dirty"], last_start, org_id, limit, allowed)
            if not dirty:
                return 0, []
            orgs_col = [r[0] for r in dirty]
            starts_col = [r[1] for r in dirty]
            totals = [
                UsageTotal(*r) for r in await conn.fetch(Q["batch_totals"], orgs_col, starts_col)
            ]
            ledger_sums: list[UsageTotal] = []
            revisions: dict[tuple[str, str, int], int] = {}
            for o, m, b, v, rev in await conn.fetch(Q["batch_ledger"], orgs_col, starts_col):
                ledger_sums.append(UsageTotal(o, m, b, v))
                revisions[(o, m, b)] = rev
            org_ids = sorted(set(orgs_col))
            carries = [Carry(*r) for r in await conn.fetch(Q["batch_carries"], org_ids)]
            plan = planner(
                RollupBatch(
                    totals=totals,
                    ledger_sums=ledger_sums,
                    revisions=revisions,
                    carries=carries,
                    orgs=await self._orgs(conn, org_ids),
                )
            )
            if plan.rows:
                rows = plan.rows
                await conn.execute(
                    Q["insert_rows"],
                    [r.identifier for r in rows],
                    [r.org_id for r in rows],
                    [r.meter for r in rows],
                    [r.bucket_start for r in rows],
                    [r.bucket_end for r in rows],
                    [r.revision for r in rows],
                    [r.value_micros for r in rows],
                    [r.quantity for r in rows],
                    [r.state.value for r in rows],
                    [r.reason for r in rows],
                    now,
                )
            if plan.carries:
                c = plan.carries
                await conn.execute(
                    Q["upsert_carries"],
                    [x.org_id for x in c],
                    [x.meter for x in c],
                    [x.segment for x in c],
                    [x.exact_micros for x in c],
                    [x.quantity for x in c],
                )
            marks = {(r[0], r[1]): r[2] for r in dirty}
            if plan.held:
                h = plan.held
                await conn.execute(
                    Q["hold_dirty"],
                    [x.org_id for x in h],
                    [x.bucket_start for x in h],
                    [marks[(x.org_id, x.bucket_start)] for x in h],
                    [x.reason for x in h],
                )
            await conn.execute(Q["clear_dirty"], orgs_col, starts_col, [r[2] for r in dirty])
            return len(dirty), plan.rows

        return await self._tx("rollup", work, CHAIN_LOCK)

    async def unplanned_orgs(self, closed_before: int, bucket_seconds: int) -> list[str]:
        rows = await self._all(Q["unplanned_orgs"], closed_before - bucket_seconds)
        return [r[0] for r in rows]

    async def _orgs(self, conn: Conn, org_ids: list[str]) -> dict[str, Org]:
        return orgs_with_plans(await conn.fetch(Q["batch_orgs"], org_ids))

    # ledger -------------------------------------------------------------------------------

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
        rows = await self._all(
            Q["ledger"],
            org_id,
            state.value if state else None,
            start,
            end,
            limit,
            attempted,
            after_id,
        )
        return [ledger_row(r) for r in rows]

    async def sendable(
        self,
        after_id: int,
        limit: int,
        org_id: str | None = None,
        until: int | None = None,
        *,
        claim: Claim,
    ) -> list[SendItem]:
        async def work(conn: Conn) -> list[Any]:
            return list(
                await conn.fetch(
                    Q["sendable"],
                    after_id,
                    limit,
                    org_id,
                    until,
                    claim.claimant,
                    claim.at,
                    claim.until,
                )
            )

        rows = await self._tx("claim", work, CLAIM_LOCK)
        rows.sort(key=lambda r: r[0])
        return [SendItem(row=ledger_row(r), customer=r[22]) for r in rows]

    async def release_claims(self, claimant: str) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(Q["release_claims"], claimant)

        await self._tx("release claims", work)

    async def seam(self, bucket_start: int) -> SeamRows:
        return await self._run("read", lambda conn: _seam(conn, bucket_start))

    async def record_attempts(
        self,
        row_ids: Sequence[int],
        at: int,
        claim: Claim | None = None,
        *,
        flag_versions: Mapping[str, int] | None = None,
        series: Mapping[int, Attempt] | None = None,
    ) -> dict[int, int]:
        ids = sorted(row_ids)
        calls = [(series or {}).get(i) for i in ids]

        async def work(conn: Conn) -> dict[int, int]:
            if flag_versions is not None:
                # shared: senders do not wait for each other, only for a flag write
                await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", FLAGS_LOCK)
                check_flags_unchanged(flag_versions, await _flag_versions(conn))
            rows = await conn.fetch(
                Q["record_attempts"],
                ids,
                at,
                claim.claimant if claim else None,
                claim.until if claim else None,
                [c.customer if c else None for c in calls],
                [c.timestamp if c else None for c in calls],
                [c.key if c else None for c in calls],
            )
            return {r[0]: r[1] for r in rows}

        return await self._tx("record attempts", work)

    async def release_attempts(self, row_ids: Sequence[int]) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(Q["release_attempts"], list(row_ids))

        await self._tx("release attempts", work)

    async def settle(
        self, settlements: Sequence[Settlement], at: int, actor: str, claimant: str = ""
    ) -> int:
        excluding = any(s.state is RowState.EXCLUDED for s in settlements)

        async def work(conn: Conn) -> int:
            ids = sorted(s.row_id for s in settlements)
            open_ids = {r[0] for r in await conn.fetch(Q["settleable"], ids)}
            moving = [s for s in settlements if s.row_id in open_ids]
            if not moving:
                return 0
            await conn.execute(
                Q["settle_rows"],
                [s.row_id for s in moving],
                [s.state.value for s in moving],
                [s.reason for s in moving],
                [s.detail for s in moving],
                [s.provider_id for s in moving],
                [at if s.state is RowState.SENT else None for s in moving],
                at,
            )
            sent = [
                AuditEntry(
                    action="ledger.sent",
                    subject=s.identifier,
                    actor=actor,
                    after={
                        "quantity": s.quantity,
                        "customer": s.customer,
                        "provider_id": s.provider_id,
                    },
                )
                for s in moving
                if s.state is RowState.SENT
            ]
            excluded = [s.row_id for s in moving if s.state is RowState.EXCLUDED]
            if excluded:
                await self._requantify(conn, excluded, at, claimant)
            await self._append_audit(conn, sent, at)
            return len(moving)

        locks = (CHAIN_LOCK,) if excluding else ()
        return await self._tx("settle", work, *locks)

    async def _requantify(self, conn: Conn, row_ids: list[int], at: int, claimant: str) -> None:
        """Rows just excluded (or cancelled) left the billable rounding chain: re-derive the
        quantities of every chain of their (org, meter) and store the carries (see the SQLite
        plugin)."""
        for org_id, meter in await conn.fetch(Q["row_chains"], row_ids):
            rows = await conn.fetch(Q["chain_rows"], org_id, meter, claimant, at)
            for name, chain in chains(rows).items():
                changed, exact, whole = requantify(chain)
                if changed:
                    await conn.execute(
                        Q["set_quantities"], list(changed), list(changed.values()), at
                    )
                c = carry(org_id, meter, name, exact, whole)
                await conn.execute(
                    Q["upsert_carry"], org_id, meter, name, c.exact_micros, c.quantity
                )

    async def cancel_rows(
        self, row_ids: Sequence[int], at: int, actor: str, reason: str, detail: str | None = None
    ) -> int:
        async def work(conn: Conn) -> int:
            found = await conn.fetch(Q["cancellable"], sorted(row_ids))
            if not found:
                return 0
            await conn.execute(Q["cancel_rows"], [r[0] for r in found], reason, detail, at)
            await self._append_audit(
                conn,
                [
                    AuditEntry(
                        action="ledger.cancelled",
                        subject=identifier,
                        actor=actor,
                        reason=reason,
                        before={"state": state},
                        after={"state": "cancelled", "quantity": quantity},
                    )
                    for _, identifier, quantity, state in found
                ],
                at,
            )
            # they left the billable rounding chain: its fractions stay behind
            await self._requantify(conn, [r[0] for r in found], at, "")
            return len(found)

        return await self._tx("cancel rows", work, CHAIN_LOCK)

    async def late_rows(self, period: ClosedPeriod) -> list[LedgerRow]:
        rows = await self._all(
            Q["late_rows"],
            period.org_id,
            period.period_start,
            period.period_end,
            period.finalized_at,
        )
        return [ledger_row(r) for r in rows]

    async def reissue_rows(
        self, row_ids: Sequence[int], at: int, actor: str, detail: str
    ) -> list[NewRow]:
        async def work(conn: Conn) -> list[NewRow]:
            found = [Reissue(*r) for r in await conn.fetch(Q["reissuable"], sorted(row_ids))]
            new: list[NewRow] = []
            taken: dict[tuple[str, str, int], int] = {}
            for old in found:
                row = old.next(detail, taken)
                await conn.execute(
                    Q["cancel_rows"],
                    [old.id],
                    Reason.REISSUED.value,
                    f"{detail}; re-issued as {row.identifier}",
                    at,
                )
                await conn.execute(
                    Q["insert_reissue"],
                    row.identifier,
                    row.org_id,
                    row.meter,
                    row.bucket_start,
                    row.bucket_end,
                    row.revision,
                    row.value_micros,
                    row.quantity,
                    row.detail,
                    at,
                )
                new.append(row)
            await self._append_audit(
                conn,
                [old.audit(row, actor, detail) for old, row in zip(found, new, strict=True)],
                at,
            )
            if found:
                await self._requantify(conn, [old.id for old in found], at, "")
            return new

        return await self._tx("reissue rows", work, CHAIN_LOCK)

    async def live_claims(self, at: int) -> int:
        ((count,),) = await self._all(Q["live_claims"], at)
        return int(count)

    # orgs ---------------------------------------------------------------------------------

    async def get_org(self, org_id: str) -> Org | None:
        async def read(conn: Conn) -> Org | None:
            row = await conn.fetchrow(Q["get_org"], org_id)
            if row is None:
                return None
            plans = await conn.fetch(Q["org_plans"], org_id)
            return Org(
                org_id=row[0],
                customer=row[1],
                updated_at=row[2],
                plans=[PlanPeriod(plan=p, effective_from=f) for p, f in plans],
                subscription=row[3],
                subscription_status=row[4],
            )

        return await self._tx("read org", read)

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
        async def work(conn: Conn) -> None:
            if customer is not None:  # one claim of a customer at a time
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(customer))
                owner = await conn.fetchval(Q["customer_owner"], customer, org_id)
                check_customer_free(customer, org_id, owner)
            await conn.execute(Q["upsert_org"], org_id, customer, at)
            if plan is not None:
                await conn.execute(Q["upsert_plan"], org_id, effective_from, plan)
            await self._append_audit(conn, [audit], at)

        await self._tx("set org", work)
        org = await self.get_org(org_id)
        assert org is not None
        return org

    async def orgs_without_customer(self, plan: str, at: int) -> list[str]:
        return [r[0] for r in await self._all(Q["plan_orgs_without_customer"], plan, at)]

    # flags and audit ----------------------------------------------------------------------

    async def runtime_flags(self) -> dict[str, RuntimeFlag]:
        rows = await self._all(Q["runtime_flags"])
        return {
            n: RuntimeFlag(name=n, value=_decode.decode(v), version=ver, updated_at=u)
            for n, v, ver, u in rows
        }

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
        async def work(conn: Conn) -> dict[str, RuntimeFlag]:
            versions = await _flag_versions(conn)
            check_flag_versions(
                {**(flag_versions or {}), **{w.name: w.expected_version for w in writes}},
                versions,
            )
            if static is not None:
                check_static(static, await conn.fetchval(Q["get_setting_for_update"], STATIC_FLAGS))
                await conn.execute(
                    Q["upsert_setting"], STATIC_FLAGS, _json.encode(static.after).decode()
                )
            if guard is not None:
                await guard(lambda start: _seam(conn, start))
            out: dict[str, RuntimeFlag] = {}
            for w in writes:
                version = versions.get(w.name, 0) + 1
                value = _json.encode(w.value).decode()
                await conn.execute(Q["upsert_flag"], w.name, value, version, at)
                out[w.name] = RuntimeFlag(
                    name=w.name, value=w.value, version=version, updated_at=at
                )
            await self._append_audit(conn, audit, at)
            return out

        # the flags lock first (it waits for the senders recording attempts under the flags
        # they read, which take no other lock), then the audit lock, as every appender does
        return await self._tx("write flags", work, FLAGS_LOCK, AUDIT_LOCK)

    async def static_flags(self) -> dict[str, Any] | None:
        rows = await self._all(Q["get_setting"], STATIC_FLAGS)
        return _decode.decode(rows[0][0]) if rows else None

    async def _append_audit(self, conn: Conn, entries: Sequence[AuditEntry], at: int) -> None:
        if not entries:
            return
        await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK)
        prev = await conn.fetchval(Q["last_audit_hash"]) or audit_chain.GENESIS
        await conn.executemany(
            Q["insert_audit"], audit_chain.chain_rows(prev, at, entries, self.sign)
        )

    async def append_audit(self, entries: Sequence[AuditEntry], at: int) -> None:
        async def work(conn: Conn) -> None:
            await self._append_audit(conn, entries, at)

        await self._tx("append audit", work)

    async def audit_log(
        self, *, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        return [audit_record(r) for r in await self._all(Q["audit_log"], action_prefix, limit)]

    async def audit_chain(self, after_id: int, limit: int) -> list[AuditRecord]:
        return [audit_record(r) for r in await self._all(Q["audit_chain"], after_id, limit)]

    # jobs ---------------------------------------------------------------------------------

    async def record_job_run(self, run: JobRun) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(
                Q["insert_job_run"],
                run.job,
                run.started_at,
                run.ended_at,
                run.outcome,
                _json.encode(run.counts).decode(),
                run.error,
            )

        await self._tx("record job run", work)

    async def job_runs(self, job: str | None = None, limit: int = 50) -> list[JobRun]:
        rows = await self._all(Q["job_runs"], job, limit)
        return [
            JobRun(job=j, started_at=s, ended_at=e, outcome=o, counts=_decode.decode(c), error=err)
            for j, s, e, o, c, err in rows
        ]

    # parity -------------------------------------------------------------------------------

    async def usage_by_org(self, meter: str, start: int, end: int) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._all(Q["usage_by_org"], meter, start, end)}

    async def record_parity_run(
        self, run: ParityRun, drifts: Sequence[OrgDrift], alert: ParityAlert | None
    ) -> int | None:
        async def work(conn: Conn) -> int | None:
            run_id: int | None = await conn.fetchval(
                Q["insert_parity_run"],
                run.meter,
                run.bucket_start,
                run.bucket_end,
                run.checked_at,
                run.orgs,
                run.mismatches,
                run.material,
                run.controlplane_micros,
                run.legacy_micros,
                run.worst_org,
                run.worst_drift_micros,
                run.worst_relative,
                run.clean,
                run.alarming,
                run.alarm_since,
            )
            if run_id is None:
                return None  # that bucket was checked already
            await conn.executemany(
                Q["insert_parity_mismatch"],
                [(run_id, d.org_id, d.controlplane_micros, d.legacy_micros) for d in drifts],
            )
            if alert is not None:
                await _insert_alert(conn, alert)
            return run_id

        return await self._tx("record parity run", work)

    async def parity_runs(
        self, meter: str, *, limit: int = 100, start: int | None = None, end: int | None = None
    ) -> list[ParityRun]:
        return [parity_run(r) for r in await self._all(Q["parity_runs"], meter, start, end, limit)]

    async def parity_run(self, run_id: int) -> tuple[ParityRun, list[OrgDrift]] | None:
        rows = await self._all(Q["parity_run"], run_id)
        if not rows:
            return None
        drifts = await self._all(Q["parity_run_mismatches"], run_id)
        return parity_run(rows[0]), [OrgDrift(o, c, lg) for o, c, lg in drifts]

    async def parity_clean_tail(self, meter: str) -> list[int]:
        return [r[0] for r in await self._all(Q["parity_clean_tail"], meter)]

    async def parity_alerts(
        self,
        meter: str,
        *,
        since: int | None = None,
        states: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[ParityAlert]:
        rows = await self._all(
            Q["parity_alerts"], meter, since, None if states is None else list(states), limit
        )
        return [
            ParityAlert(
                id=r[0],
                meter=r[1],
                bucket_start=r[2],
                dedup_key=r[3],
                text=r[4],
                state=r[5],
                created_at=r[6],
                attempts=r[7],
                sent_at=r[8],
                error=r[9],
            )
            for r in rows
        ]

    async def update_parity_alert(
        self, alert_id: int, *, state: str, attempts: int, sent_at: int | None, error: str | None
    ) -> None:
        async def work(conn: Conn) -> None:
            await conn.execute(Q["update_parity_alert"], state, attempts, sent_at, error, alert_id)

        await self._tx("update parity alert", work)

    # catalog and webhooks -----------------------------------------------------------------

    async def catalog_version(self, version: int | None = None) -> CatalogVersion | None:
        if version is None:
            rows = await self._all(Q["latest_catalog"])
        else:
            rows = await self._all(Q["catalog_version"], version)
        if not rows:
            return None
        v, published_at, actor, digest, catalog = rows[0]
        return CatalogVersion(
            version=v,
            published_at=published_at,
            actor=actor,
            digest=digest,
            catalog=_decode.decode(catalog),
        )

    async def publish_catalog(
        self, catalog: dict[str, Any], digest: str, actor: str, at: int, audit: AuditEntry
    ) -> CatalogVersion:
        async def work(conn: Conn) -> int:
            version = int(
                await conn.fetchval(
                    Q["insert_catalog"], at, actor, digest, _json.encode(catalog).decode()
                )
            )
            after = dict(audit.after) if isinstance(audit.after, dict) else {}
            await self._append_audit(
                conn, [msgspec.structs.replace(audit, after={**after, "version": version})], at
            )
            return version

        # the audit lock first: publishers queue up, and each numbers after the last
        version = await self._tx("publish catalog", work, AUDIT_LOCK)
        return CatalogVersion(
            version=version, published_at=at, actor=actor, digest=digest, catalog=catalog
        )

    async def webhook_outcome(self, event_id: str) -> str | None:
        rows = await self._all(Q["webhook_event"], event_id)
        return str(rows[0][0]) if rows else None

    async def record_webhook(
        self,
        record: WebhookRecord,
        at: int,
        *,
        org: OrgChange | None = None,
        closed: ClosedPeriod | None = None,
        audit: Sequence[AuditEntry] = (),
    ) -> bool:
        async def work(conn: Conn) -> bool:
            inserted = await conn.fetchval(
                Q["insert_webhook_event"],
                record.event_id,
                record.type,
                record.created,
                at,
                record.outcome,
            )
            if inserted is None:
                return False
            if org is not None:
                await conn.execute(Q["upsert_org"], org.org_id, org.customer, at)
                row = await conn.fetchrow(Q["org_subscription"], org.org_id)
                subscription, status = row if row else (None, None)
                await conn.execute(
                    Q["set_org_subscription"],
                    org.subscription or subscription,
                    org.subscription_status or status,
                    at,
                    org.org_id,
                )
                if org.plan is not None:
                    await conn.execute(Q["upsert_plan"], org.org_id, org.effective_from, org.plan)
            if closed is not None:
                await conn.execute(
                    Q["insert_closed_period"],
                    closed.invoice_id,
                    closed.org_id,
                    closed.period_start,
                    closed.period_end,
                    closed.finalized_at,
                )
            await self._append_audit(conn, audit, at)
            return True

        return await self._tx(f"recording webhook {record.event_id}", work)

    async def org_for_billing(
        self, *, subscription: str | None, customer: str | None
    ) -> str | None:
        if subscription:
            rows = await self._all(Q["org_by_subscription"], subscription)
            if rows:
                return str(rows[0][0])
        if customer:
            rows = await self._all(Q["org_by_customer"], customer)
            if rows:
                return str(rows[0][0])
        return None

    async def closed_periods(self, org_ids: Sequence[str]) -> list[ClosedPeriod]:
        return [ClosedPeriod(*r) for r in await self._all(Q["closed_periods"], list(org_ids))]

    # jobs and metrics ---------------------------------------------------------------------

    async def last_job_success(self, job: str) -> float | None:
        rows = await self._all(Q["last_job_success"], job)
        return float(rows[0][0]) if rows else None

    async def ledger_counts(self) -> list[LedgerCount]:
        return [LedgerCount(s, r, n) for s, r, n in await self._all(Q["ledger_counts"])]

    async def dirty_backlog(self, closed_before: int, bucket_seconds: int) -> DirtyBacklog:
        ((buckets, oldest, held),) = await self._all(
            Q["dirty_backlog"], closed_before - bucket_seconds
        )
        return DirtyBacklog(buckets=buckets, oldest_start=oldest, held=held)

    async def record_alert(self, alert: ParityAlert) -> int | None:
        return await self._tx("record alert", lambda conn: _insert_alert(conn, alert))


async def _insert_alert(conn: Conn, alert: ParityAlert) -> int | None:
    """The alert's id, or None when one for its (meter, bucket) exists already."""
    a = alert
    alert_id: int | None = await conn.fetchval(
        Q["insert_alert"], a.meter, a.bucket_start, a.dedup_key, a.text, a.state, a.created_at
    )
    return alert_id


async def _backoff(attempt: int) -> None:
    """Full jitter, doubling from 50 ms, capped at 2 s."""
    await asyncio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))


spec = PluginSpec(
    kind="storage", name="postgres", config=PostgresStorageConfig, factory=PostgresStorage
)
