"""SQLite storage: the embedded default. One file, WAL, one writer.

Every write runs under one asyncio lock on one connection (``BEGIN IMMEDIATE`` ... ``COMMIT``);
reads use a second connection, which WAL lets run alongside the writer. `synchronous = FULL`
by default, so an acknowledged batch survives a crash of the process or the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import msgspec

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
from controlplane.registry import PluginSpec
from controlplane.rollup import carry, requantify
from controlplane.units import MICROS

Q = sql.load(__package__ or "", "sqlite.sql")
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()
_org_totals = msgspec.json.Decoder(dict[str, tuple[int, int]])


class SQLiteStorageConfig(PluginConfig, tag="sqlite", tag_field="backend", frozen=True):
    path: str = "controlplane.db"
    synchronous: Literal["full", "normal"] = "full"
    busy_timeout_ms: int = 10_000


class SQLiteStorage(Storage):
    name = "sqlite"

    def __init__(self, config: SQLiteStorageConfig) -> None:
        self.config = config
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    # lifecycle ----------------------------------------------------------------------------

    async def _connect(self) -> aiosqlite.Connection:
        path = self.config.path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        await conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_ms)}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
        await conn.execute("PRAGMA foreign_keys = ON")
        # The rollup's batch tables and the sorts of large reads stay off the disk.
        await conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    async def start(self) -> None:
        if self.config.path == ":memory:":
            raise ConfigError("storage.path: ':memory:' cannot be shared by reader and writer")
        try:
            self._writer = await self._connect()
            self._reader = await self._connect()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open SQLite database {self.config.path}: {exc}") from exc

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._reader = self._writer = None

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StorageError("storage is not started")
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StorageError("storage is not started")
        return self._reader

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction: all of it commits, or none of it."""
        async with self._write_lock:
            conn = self._w
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot begin a write transaction: {exc}") from exc
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
            try:
                await conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise StorageError(f"commit failed: {exc}") from exc

    async def _all(self, query: str, params: Any = ()) -> list[Any]:
        try:
            async with self._r.execute(query, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from exc

    # schema -------------------------------------------------------------------------------

    async def _applied(self, conn: aiosqlite.Connection) -> dict[str, str]:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name TEXT PRIMARY KEY, checksum TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        async with conn.execute("SELECT name, checksum FROM schema_migrations") as cur:
            return {name: checksum for name, checksum in await cur.fetchall()}

    async def migrate(self) -> list[str]:
        known = migrations.available("sqlite")
        done: list[str] = []
        async with self._write_lock:
            conn = self._w
            for migration in migrations.pending(known, await self._applied(conn)):
                try:
                    await conn.execute("BEGIN IMMEDIATE")
                    for statement in _statements(migration.sql):
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_migrations (name, checksum, applied_at) VALUES (?,?,?)",
                        (migration.name, migration.checksum, int(time.time())),
                    )
                    await conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    await conn.execute("ROLLBACK")
                    raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
                done.append(migration.name)
        return done

    async def migration_status(self) -> MigrationStatus:
        known = migrations.available("sqlite")
        async with self._write_lock:
            applied = await self._applied(self._w)
        todo = migrations.pending(known, applied)
        return MigrationStatus(applied=sorted(applied), pending=[m.name for m in todo])

    async def ping(self) -> None:
        await self._all("SELECT 1")

    async def pin_setting(self, key: str, value: str) -> None:
        async with self._tx() as conn:
            async with conn.execute(Q["get_setting"], (key,)) as cur:
                row = await cur.fetchone()
            if row is None:
                await conn.execute(Q["put_setting"], (key, value))
            elif row[0] != value:
                raise ConfigError(
                    f"rollup.{key}: the data was written with {key} = {row[0]}; "
                    f"it cannot change to {value}"
                )

    # ingest -------------------------------------------------------------------------------

    async def insert_events(
        self, events: Sequence[StoredEvent], bucket_seconds: int
    ) -> IngestResult:
        keys = _json.encode([[e.source, e.event_id] for e in events])
        now = int(time.time())
        try:
            async with self._tx() as conn:
                async with conn.execute(Q["existing_events"], (keys,)) as cur:
                    existing = {(s, i) for s, i in await cur.fetchall()}
                async with conn.execute(Q["max_event_pk"]) as cur:
                    row = await cur.fetchone()
                    next_pk = (row[0] if row else 0) + 1
                event_rows = []
                value_rows = []
                dirty: set[tuple[str, int]] = set()
                fresh: list[StoredEvent] = []
                for e in events:
                    if (e.source, e.event_id) in existing:
                        continue
                    existing.add((e.source, e.event_id))
                    bucket = bucket_of(e.time_ms, bucket_seconds)
                    event_rows.append(
                        (
                            next_pk,
                            e.source,
                            e.event_id,
                            e.type,
                            e.org_id,
                            e.time_ms,
                            e.data.decode(),
                            now,
                        )
                    )
                    for meter, micros in e.values:
                        value_rows.append((next_pk, meter, e.org_id, bucket, micros))
                    dirty.add((e.org_id, bucket))
                    fresh.append(e)
                    next_pk += 1
                if event_rows:
                    check_batch_alone(fresh, bucket_seconds)
                    await conn.executemany(Q["insert_event"], event_rows)
                    await conn.executemany(Q["insert_meter_value"], value_rows)
                    await conn.executemany(Q["mark_dirty"], sorted(dirty))
                    await self._check_totals(conn, fresh, bucket_seconds)
        except sqlite3.Error as exc:
            raise StorageError(f"ingest failed: {exc}") from exc
        return IngestResult(accepted=len(event_rows), duplicates=len(events) - len(event_rows))

    async def _check_totals(
        self, conn: aiosqlite.Connection, events: list[StoredEvent], bucket_seconds: int
    ) -> None:
        """Refuse the batch (InvalidInput, the transaction rolls back) when it took a bucket
        total past the bound on the way, event by event: name the event that did."""
        added = bucket_sums(events, bucket_seconds)
        async with conn.execute(Q["bucket_totals_of"], (_json.encode(list(added)),)) as cur:
            after = {(o, m, b): total for o, m, b, total in await cur.fetchall()}
        before = {key: total - added[key] for key, total in after.items()}
        check_bucket_bound(events, bucket_seconds, before)

    async def usage(
        self, org_id: str | None, meter: str | None, start: int | None, end: int | None
    ) -> list[UsageTotal]:
        rows = await self._all(
            Q["usage"], {"org": org_id, "meter": meter, "start": start, "end": end}
        )
        return [
            UsageTotal(org_id=r[0], meter=r[1], bucket_start=r[2], value_micros=r[3]) for r in rows
        ]

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
        try:
            async with self._tx() as conn:
                for name in ("create_batch", "create_batch_meters", "clear_batch"):
                    await conn.execute(Q[name])
                cur = await conn.execute(
                    Q["fill_batch"],
                    {
                        "last_start": last_start,
                        "org": org_id,
                        "limit": limit,
                        "allowed": None
                        if unplanned_allowed is None
                        else _json.encode(list(unplanned_allowed)),
                    },
                )
                buckets = cur.rowcount
                await cur.close()
                if not buckets:
                    return 0, []
                await conn.execute(Q["clear_batch_meters"])
                await conn.execute(Q["fill_batch_meters"])
                async with conn.execute(Q["batch_totals"]) as cur:
                    totals = [UsageTotal(o, m, b, v) for o, m, b, v in await cur.fetchall()]
                ledger_sums: list[UsageTotal] = []
                revisions: dict[tuple[str, str, int], int] = {}
                async with conn.execute(Q["batch_ledger"]) as cur:
                    for o, m, b, v, rev in await cur.fetchall():
                        ledger_sums.append(UsageTotal(o, m, b, v))
                        revisions[(o, m, b)] = rev
                async with conn.execute(Q["batch_carries"]) as cur:
                    carries = [Carry(*row) for row in await cur.fetchall()]
                orgs = await self._orgs_in_batch(conn)
                plan = planner(
                    RollupBatch(
                        totals=totals,
                        ledger_sums=ledger_sums,
                        revisions=revisions,
                        carries=carries,
                        orgs=orgs,
                    )
                )
                await conn.executemany(
                    Q["insert_row"],
                    [
                        (
                            r.identifier,
                            r.org_id,
                            r.meter,
                            r.bucket_start,
                            r.bucket_end,
                            r.revision,
                            r.value_micros,
                            r.quantity,
                            r.state.value,
                            r.reason,
                            now,
                            now,
                        )
                        for r in plan.rows
                    ],
                )
                await conn.executemany(
                    Q["upsert_carry"],
                    [
                        (c.org_id, c.meter, c.segment, c.exact_micros, c.quantity)
                        for c in plan.carries
                    ],
                )
                await conn.executemany(
                    Q["hold_dirty"], [(h.reason, h.org_id, h.bucket_start) for h in plan.held]
                )
                await conn.execute(Q["clear_dirty"])
        except sqlite3.Error as exc:
            raise StorageError(f"rollup failed: {exc}") from exc
        return buckets, plan.rows

    async def unplanned_orgs(self, closed_before: int, bucket_seconds: int) -> list[str]:
        rows = await self._all(Q["unplanned_orgs"], {"last_start": closed_before - bucket_seconds})
        return [r[0] for r in rows]

    async def _orgs_in_batch(self, conn: aiosqlite.Connection) -> dict[str, Org]:
        async with conn.execute(Q["batch_orgs"]) as cur:
            return orgs_with_plans(await cur.fetchall())

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
            {
                "org": org_id,
                "state": state.value if state else None,
                "start": start,
                "end": end,
                "limit": limit,
                "attempted": attempted,
                "after": after_id,
            },
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
        params = {
            "after": after_id,
            "limit": limit,
            "org": org_id,
            "until": until,
            "claimant": claim.claimant,
            "at": claim.at,
        }
        async with self._tx() as conn:
            async with conn.execute(Q["sendable"], params) as cur:
                rows = list(await cur.fetchall())
            await conn.executemany(
                Q["claim_row"], [(claim.claimant, claim.until, r[0]) for r in rows]
            )
        return [SendItem(row=ledger_row(r), customer=r[22]) for r in rows]

    async def release_claims(self, claimant: str) -> None:
        async with self._tx() as conn:
            await conn.execute(Q["release_claims"], (claimant,))

    async def seam(self, bucket_start: int) -> SeamRows:
        return await self._seam(self._r, bucket_start)

    async def _seam(self, conn: aiosqlite.Connection, bucket_start: int) -> SeamRows:
        async with conn.execute(Q["seam"], (bucket_start,)) as cur:
            reached, excluded = await cur.fetchone() or (0, 0)
        return SeamRows(reached=int(reached), excluded_before_bill_from=int(excluded))

    async def _flag_versions(self, conn: aiosqlite.Connection) -> dict[str, int]:
        async with conn.execute(Q["flag_versions"]) as cur:
            return {name: version for name, version in await cur.fetchall()}

    async def record_attempts(
        self,
        row_ids: Sequence[int],
        at: int,
        claim: Claim | None = None,
        *,
        flag_versions: Mapping[str, int] | None = None,
        series: Mapping[int, Attempt] | None = None,
    ) -> dict[int, int]:
        calls = series or {}
        params = {
            "series": _json.encode(
                [[i, *(msgspec.structs.astuple(calls[i]) if i in calls else ())] for i in row_ids]
            ),
            "at": at,
            "claimant": claim.claimant if claim else None,
            "until": claim.until if claim else None,
        }
        async with self._tx() as conn:
            if flag_versions is not None:
                check_flags_unchanged(flag_versions, await self._flag_versions(conn))
            async with conn.execute(Q["record_attempts"], params) as cur:
                return {row_id: quantity for row_id, quantity in await cur.fetchall()}

    async def release_attempts(self, row_ids: Sequence[int]) -> None:
        async with self._tx() as conn:
            await conn.executemany(Q["release_attempt"], [(i,) for i in row_ids])

    async def settle(
        self, settlements: Sequence[Settlement], at: int, actor: str, claimant: str = ""
    ) -> int:
        async with self._tx() as conn:
            ids = _json.encode([s.row_id for s in settlements])
            async with conn.execute(Q["settleable"], (ids,)) as cur:
                open_ids = {r[0] for r in await cur.fetchall()}
            moving = [s for s in settlements if s.row_id in open_ids]
            await conn.executemany(
                Q["settle_row"],
                [
                    (
                        s.state.value,
                        s.reason,
                        s.detail,
                        s.provider_id,
                        at if s.state is RowState.SENT else None,
                        at,
                        s.row_id,
                    )
                    for s in moving
                ],
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
            await self._append_audit(conn, sent, at)
            excluded = [s.row_id for s in moving if s.state is RowState.EXCLUDED]
            if excluded:
                await self._requantify(conn, excluded, at, claimant)
        return len(moving)

    async def cancel_rows(
        self, row_ids: Sequence[int], at: int, actor: str, reason: str, detail: str | None = None
    ) -> int:
        async with self._tx() as conn:
            async with conn.execute(Q["cancellable"], (_json.encode(list(row_ids)),)) as cur:
                found = list(await cur.fetchall())
            await conn.executemany(Q["cancel_row"], [(reason, detail, at, r[0]) for r in found])
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
            if found:  # they left the billable rounding chain: its fractions stay behind
                await self._requantify(conn, [r[0] for r in found], at, "")
        return len(found)

    async def late_rows(self, period: ClosedPeriod) -> list[LedgerRow]:
        params = {
            "org": period.org_id,
            "start": period.period_start,
            "end": period.period_end,
            "finalized": period.finalized_at,
        }
        return [ledger_row(r) for r in await self._all(Q["late_rows"], params)]

    async def reissue_rows(
        self, row_ids: Sequence[int], at: int, actor: str, detail: str
    ) -> list[NewRow]:
        new: list[NewRow] = []
        async with self._tx() as conn:
            async with conn.execute(Q["reissuable"], (_json.encode(list(row_ids)),)) as cur:
                found = [Reissue(*r) for r in await cur.fetchall()]
            taken: dict[tuple[str, str, int], int] = {}
            for old in found:
                row = old.next(detail, taken)
                await conn.execute(
                    Q["cancel_row"],
                    (Reason.REISSUED.value, f"{detail}; re-issued as {row.identifier}", at, old.id),
                )
                await conn.execute(
                    Q["insert_reissue"],
                    (
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
                        at,
                    ),
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

    async def live_claims(self, at: int) -> int:
        ((count,),) = await self._all(Q["live_claims"], (at,))
        return int(count)

    async def _requantify(
        self, conn: aiosqlite.Connection, row_ids: list[int], at: int, claimant: str
    ) -> None:
        """Rows just excluded (or cancelled) left the billable rounding chain: re-derive the
        quantities of every chain of their (org, meter) and store the carries."""
        async with conn.execute(Q["row_chains"], (_json.encode(row_ids),)) as cur:
            pairs = list(await cur.fetchall())
        for org_id, meter in pairs:
            params = {"org": org_id, "meter": meter, "claimant": claimant, "at": at}
            async with conn.execute(Q["chain_rows"], params) as cur:
                rows = list(await cur.fetchall())
            for name, chain in chains(rows).items():
                changed, exact, whole = requantify(chain)
                await conn.executemany(
                    Q["set_quantity"], [(q, at, row_id) for row_id, q in changed.items()]
                )
                c = carry(org_id, meter, name, exact, whole)
                await conn.execute(
                    Q["upsert_carry"], (org_id, meter, name, c.exact_micros, c.quantity)
                )

    # orgs ---------------------------------------------------------------------------------

    async def get_org(self, org_id: str) -> Org | None:
        rows = await self._all(Q["get_org"], (org_id,))
        if not rows:
            return None
        plans = await self._all(Q["org_plans"], (org_id,))
        ((subscription, status),) = await self._all(Q["org_subscription"], (org_id,))
        return Org(
            org_id=rows[0][0],
            customer=rows[0][1],
            updated_at=rows[0][2],
            plans=[PlanPeriod(plan=p, effective_from=f) for p, f in plans],
            subscription=subscription,
            subscription_status=status,
        )

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
        async with self._tx() as conn:
            if customer is not None:
                async with conn.execute(Q["customer_owner"], (customer, org_id)) as cur:
                    row = await cur.fetchone()
                check_customer_free(customer, org_id, row[0] if row else None)
            await conn.execute(Q["upsert_org"], (org_id, customer, at))
            if plan is not None:
                await conn.execute(Q["upsert_plan"], (org_id, effective_from, plan))
            await self._append_audit(conn, [audit], at)
        org = await self.get_org(org_id)
        assert org is not None
        return org

    # flags and audit ----------------------------------------------------------------------

    async def orgs_without_customer(self, plan: str, at: int) -> list[str]:
        rows = await self._all(Q["plan_orgs_without_customer"], {"plan": plan, "at": at})
        return [r[0] for r in rows]

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
        out: dict[str, RuntimeFlag] = {}
        async with self._tx() as conn:
            versions = await self._flag_versions(conn)
            check_flag_versions(
                {**(flag_versions or {}), **{w.name: w.expected_version for w in writes}},
                versions,
            )
            if static is not None:
                async with conn.execute(Q["get_setting"], (STATIC_FLAGS,)) as cur:
                    row = await cur.fetchone()
                check_static(static, row[0] if row else None)
                await conn.execute(
                    Q["upsert_setting"], (STATIC_FLAGS, _json.encode(static.after).decode())
                )
            if guard is not None:
                await guard(lambda start: self._seam(conn, start))
            for w in writes:
                version = versions.get(w.name, 0) + 1
                await conn.execute(
                    Q["upsert_flag"], (w.name, _json.encode(w.value).decode(), version, at)
                )
                out[w.name] = RuntimeFlag(
                    name=w.name, value=w.value, version=version, updated_at=at
                )
            await self._append_audit(conn, audit, at)
        return out

    async def static_flags(self) -> dict[str, Any] | None:
        rows = await self._all(Q["get_setting"], (STATIC_FLAGS,))
        return _decode.decode(rows[0][0]) if rows else None

    async def _append_audit(
        self, conn: aiosqlite.Connection, entries: Sequence[AuditEntry], at: int
    ) -> None:
        if not entries:
            return
        async with conn.execute(Q["last_audit_hash"]) as cur:
            row = await cur.fetchone()
        prev = row[0] if row else audit_chain.GENESIS
        await conn.executemany(
            Q["insert_audit"], audit_chain.chain_rows(prev, at, entries, self.sign)
        )

    async def append_audit(self, entries: Sequence[AuditEntry], at: int) -> None:
        async with self._tx() as conn:
            await self._append_audit(conn, entries, at)

    async def audit_log(
        self, *, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        rows = await self._all(Q["audit_log"], {"prefix": action_prefix, "limit": limit})
        return [audit_record(r) for r in rows]

    async def audit_chain(self, after_id: int, limit: int) -> list[AuditRecord]:
        return [audit_record(r) for r in await self._all(Q["audit_chain"], (after_id, limit))]

    # jobs ---------------------------------------------------------------------------------

    async def record_job_run(self, run: JobRun) -> None:
        async with self._tx() as conn:
            await conn.execute(
                Q["insert_job_run"],
                (
                    run.job,
                    run.started_at,
                    run.ended_at,
                    run.outcome,
                    _json.encode(run.counts).decode(),
                    run.error,
                ),
            )

    async def job_runs(self, job: str | None = None, limit: int = 50) -> list[JobRun]:
        rows = await self._all(Q["job_runs"], {"job": job, "limit": limit})
        return [
            JobRun(job=j, started_at=s, ended_at=e, outcome=o, counts=_decode.decode(c), error=err)
            for j, s, e, o, c, err in rows
        ]

    # parity -------------------------------------------------------------------------------

    async def usage_by_org(self, meter: str, start: int, end: int) -> dict[str, int]:
        ((first, last),) = await self._all(Q["bucket_span"], (meter,))
        if first is None or end <= first or start > last:
            return {}
        # Read the window's rows through the bucket index when it covers at most an eighth of
        # the meter's history (the checker's single bucket), else scan the history in key
        # order: each costs about the same at that ratio (see docs/benchmarks.md).
        narrow = (min(end, last + 1) - max(start, first)) * 8 <= last - first
        query = Q["usage_by_org_narrow" if narrow else "usage_by_org"]
        rows = await self._all(query, {"meter": meter, "start": start, "end": end})
        if not rows or not rows[0][0]:
            return {}
        return {
            org: units * MICROS + micros
            for org, (units, micros) in _org_totals.decode(rows[0][0]).items()
        }

    async def record_parity_run(
        self, run: ParityRun, drifts: Sequence[OrgDrift], alert: ParityAlert | None
    ) -> int | None:
        try:
            async with self._tx() as conn:
                cur = await conn.execute(
                    Q["insert_parity_run"],
                    (
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
                        int(run.clean),
                        int(run.alarming),
                        run.alarm_since,
                    ),
                )
                if not cur.rowcount:
                    return None  # that bucket was checked already
                run_id = cur.lastrowid
                await conn.executemany(
                    Q["insert_parity_mismatch"],
                    [(run_id, d.org_id, d.controlplane_micros, d.legacy_micros) for d in drifts],
                )
                if alert is not None:
                    await _insert_alert(conn, alert)
        except sqlite3.Error as exc:
            raise StorageError(f"recording a parity run failed: {exc}") from exc
        return run_id

    async def parity_runs(
        self, meter: str, *, limit: int = 100, start: int | None = None, end: int | None = None
    ) -> list[ParityRun]:
        rows = await self._all(
            Q["parity_runs"], {"meter": meter, "start": start, "end": end, "limit": limit}
        )
        return [parity_run(r) for r in rows]

    async def parity_run(self, run_id: int) -> tuple[ParityRun, list[OrgDrift]] | None:
        rows = await self._all(Q["parity_run"], (run_id,))
        if not rows:
            return None
        drifts = await self._all(Q["parity_run_mismatches"], (run_id,))
        return parity_run(rows[0]), [OrgDrift(o, c, lg) for o, c, lg in drifts]

    async def parity_clean_tail(self, meter: str) -> list[int]:
        return [r[0] for r in await self._all(Q["parity_clean_tail"], {"meter": meter})]

    async def parity_alerts(
        self,
        meter: str,
        *,
        since: int | None = None,
        states: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[ParityAlert]:
        rows = await self._all(
            Q["parity_alerts"],
            {
                "meter": meter,
                "since": since,
                "states": None if states is None else _json.encode(list(states)).decode(),
                "limit": limit,
            },
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
        async with self._tx() as conn:
            await conn.execute(
                Q["update_parity_alert"], (state, attempts, sent_at, error, alert_id)
            )

    # catalog and webhooks -----------------------------------------------------------------

    async def catalog_version(self, version: int | None = None) -> CatalogVersion | None:
        if version is None:
            rows = await self._all(Q["latest_catalog"])
        else:
            rows = await self._all(Q["catalog_version"], (version,))
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
        try:
            async with self._tx() as conn:
                async with conn.execute(
                    Q["insert_catalog"], (at, actor, digest, _json.encode(catalog).decode())
                ) as cur:
                    row = await cur.fetchone()
                assert row is not None
                version = int(row[0])
                after = dict(audit.after) if isinstance(audit.after, dict) else {}
                await self._append_audit(
                    conn,
                    [msgspec.structs.replace(audit, after={**after, "version": version})],
                    at,
                )
        except sqlite3.Error as exc:
            raise StorageError(f"publishing the catalog failed: {exc}") from exc
        return CatalogVersion(
            version=version, published_at=at, actor=actor, digest=digest, catalog=catalog
        )

    async def webhook_outcome(self, event_id: str) -> str | None:
        rows = await self._all(Q["webhook_event"], (event_id,))
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
        try:
            async with self._tx() as conn:
                cur = await conn.execute(
                    Q["insert_webhook_event"],
                    (record.event_id, record.type, record.created, at, record.outcome),
                )
                if not cur.rowcount:
                    return False
                if org is not None:
                    await conn.execute(Q["upsert_org"], (org.org_id, org.customer, at))
                    async with conn.execute(Q["org_subscription"], (org.org_id,)) as c:
                        row = await c.fetchone()
                    subscription, status = row if row else (None, None)
                    await conn.execute(
                        Q["set_org_subscription"],
                        (
                            org.subscription or subscription,
                            org.subscription_status or status,
                            at,
                            org.org_id,
                        ),
                    )
                    if org.plan is not None:
                        await conn.execute(
                            Q["upsert_plan"], (org.org_id, org.effective_from, org.plan)
                        )
                if closed is not None:
                    await conn.execute(
                        Q["insert_closed_period"],
                        (
                            closed.invoice_id,
                            closed.org_id,
                            closed.period_start,
                            closed.period_end,
                            closed.finalized_at,
                        ),
                    )
                await self._append_audit(conn, audit, at)
        except sqlite3.Error as exc:
            raise StorageError(f"recording webhook {record.event_id} failed: {exc}") from exc
        return True

    async def org_for_billing(
        self, *, subscription: str | None, customer: str | None
    ) -> str | None:
        if subscription:
            rows = await self._all(Q["org_by_subscription"], (subscription,))
            if rows:
                return str(rows[0][0])
        if customer:
            rows = await self._all(Q["org_by_customer"], (customer,))
            if rows:
                return str(rows[0][0])
        return None

    async def closed_periods(self, org_ids: Sequence[str]) -> list[ClosedPeriod]:
        rows = await self._all(Q["closed_periods"], (_json.encode(list(org_ids)).decode(),))
        return [ClosedPeriod(*r) for r in rows]

    # jobs and metrics (appended) ----------------------------------------------------------

    async def last_job_success(self, job: str) -> float | None:
        rows = await self._all(Q["last_job_success"], (job,))
        return float(rows[0][0]) if rows else None

    async def ledger_counts(self) -> list[LedgerCount]:
        return [LedgerCount(s, r, n) for s, r, n in await self._all(Q["ledger_counts"])]

    async def dirty_backlog(self, closed_before: int, bucket_seconds: int) -> DirtyBacklog:
        ((buckets, oldest, held),) = await self._all(
            Q["dirty_backlog"], {"last_start": closed_before - bucket_seconds}
        )
        return DirtyBacklog(buckets=buckets, oldest_start=oldest, held=held)

    async def record_alert(self, alert: ParityAlert) -> int | None:
        try:
            async with self._tx() as conn:
                return await _insert_alert(conn, alert)
        except sqlite3.Error as exc:
            raise StorageError(f"recording an alert failed: {exc}") from exc


async def _insert_alert(conn: aiosqlite.Connection, alert: ParityAlert) -> int | None:
    """The alert's id, or None when one for its (meter, bucket) exists already."""
    a = alert
    cur = await conn.execute(
        Q["insert_alert"], (a.meter, a.bucket_start, a.dedup_key, a.text, a.state, a.created_at)
    )
    return cur.lastrowid if cur.rowcount else None


def _statements(script: str) -> list[str]:
    """Split a migration file into statements (complete per sqlite3.complete_statement)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if not buf and line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


spec = PluginSpec(kind="storage", name="sqlite", config=SQLiteStorageConfig, factory=SQLiteStorage)
