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

The storage methods are :class:`~controlplane.plugins.storage.base.SQLStorage`'s; this module
is the dialect (`postgres.sql`, lists as arrays, bulk statements with each column as an array,
transaction advisory locks by name) and the driver (asyncpg).

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog

from controlplane import migrations, sql
from controlplane.errors import ConfigError, StorageError, TransientStorageError
from controlplane.events import bucket_of
from controlplane.interfaces import IngestResult, StorageConfig, StoredEvent
from controlplane.plugins.storage._common import (
    bucket_sums,
    check_batch_alone,
    check_bucket_bound,
)
from controlplane.plugins.storage.base import (
    Connection,
    DirtyBatch,
    Row,
    SQLStorage,
    gauge_touches,
    point_order,
)
from controlplane.registry import PluginSpec, require
from controlplane.secrets import Secret, check_url, reveal

Q = sql.load(__package__ or "", "postgres.sql")
T = TypeVar("T")
Conn = Any  # asyncpg.Connection: asyncpg ships no type hints
log = structlog.get_logger("storage.postgres")


def _lock_key(name: str) -> int:
    """A stable advisory lock key per name (signed 64-bit, as PostgreSQL wants)."""
    return zlib.crc32(f"controlplane:{name}".encode()) - 2**31


MIGRATE_LOCK = _lock_key("migrate")


class PostgresStorageConfig(StorageConfig, tag="postgres", tag_field="backend", frozen=True):
    dsn: Secret = "postgresql://localhost/controlplane"
    min_connections: int = 2
    max_connections: int = 10
    command_timeout_seconds: float = 60.0
    retries: int = 5  # attempts for a transaction that failed transiently

    def where(self) -> str:
        """`PostgreSQL database NAME on HOST`: never the user name or the password."""
        try:
            parts = urlsplit(reveal(self.dsn, "storage.dsn"))
            host = parts.hostname or "localhost"
        except (ConfigError, ValueError):
            return "PostgreSQL (storage.dsn)"
        database = parts.path.lstrip("/") or "(default)"
        return f"PostgreSQL database {database} on {host}"


class PostgresConnection(Connection):
    """An asyncpg connection running `postgres.sql`'s queries."""

    def __init__(self, raw: Conn) -> None:
        self.raw = raw

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return list(await self.raw.fetch(Q[query], *args))

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        return await self.raw.fetchrow(Q[query], *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.raw.fetchval(Q[query], *args)

    async def execute(self, query: str, *args: Any) -> None:
        await self.raw.execute(Q[query], *args)

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(Q[query], rows)

    async def bulk(self, query: str, rows: Sequence[Sequence[Any]], *args: Any) -> None:
        if rows:
            columns = [list(column) for column in zip(*rows, strict=True)]
            await self.raw.execute(Q[query], *columns, *args)

    async def lock(self, name: str, *, shared: bool = False) -> None:
        query = "advisory_xact_lock_shared" if shared else "advisory_xact_lock"
        await self.raw.execute(Q[query], _lock_key(name))


class PostgresStorage(SQLStorage):
    name = "postgres"

    def __init__(self, config: PostgresStorageConfig) -> None:
        self.config = config
        self._pg: Any = None
        self._pool: Any = None
        self._transient: tuple[type[BaseException], ...] = ()
        self._errors: tuple[type[BaseException], ...] = ()

    # lifecycle ----------------------------------------------------------------------------

    async def start(self, *, create: bool = True) -> None:
        # PostgreSQL never creates a database here: `create` has nothing to refuse
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

    # the driver contract ------------------------------------------------------------------

    async def _tx(self, what: str, work: Callable[[Connection], Awaitable[T]], *locks: str) -> T:
        """Run `work` in one transaction (after taking `locks`, transaction advisory locks,
        in order), retrying transient failures; every driver error becomes StorageError."""

        async def in_transaction(raw: Conn) -> T:
            async with raw.transaction():
                conn = PostgresConnection(raw)
                for name in locks:
                    await conn.lock(name)
                return await work(conn)

        return await self._run(what, in_transaction)

    async def _read(self, what: str, work: Callable[[Connection], Awaitable[T]]) -> T:
        """No transaction around a read (one round trip, not three)."""
        return await self._run(what, lambda raw: work(PostgresConnection(raw)))

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

    def _array(self, values: Sequence[Any]) -> list[Any]:
        return list(values)

    @contextlib.asynccontextmanager
    async def _migrating(self) -> AsyncIterator[migrations.Session]:
        """Replicas starting together wait for each other (a session advisory lock) instead
        of racing."""
        try:
            async with self._p().acquire() as conn:
                await conn.execute(Q["advisory_lock"], MIGRATE_LOCK)
                try:
                    yield _Migrations(conn, self._pg.PostgresError)
                finally:
                    await conn.execute(Q["advisory_unlock"], MIGRATE_LOCK)
        except self._errors as exc:
            raise StorageError(f"migrate failed: {exc}") from exc

    @contextlib.asynccontextmanager
    async def exclusive(self, job: str, *, wait: bool = False) -> AsyncIterator[bool]:
        key = _lock_key(f"job:{job}")
        try:
            conn = await self._p().acquire()
        except self._errors as exc:
            raise StorageError(f"cannot take the {job} lock: {exc}") from exc
        try:
            try:
                if wait:
                    await conn.execute(Q["advisory_lock"], key)
                    held = True
                else:
                    held = bool(await conn.fetchval(Q["try_advisory_lock"], key))
            except self._errors as exc:  # a timeout: another replica's pass runs long
                raise TransientStorageError(f"cannot take the {job} lock: {exc}") from exc
            try:
                yield held
            finally:
                if held:
                    with contextlib.suppress(Exception):
                        await conn.execute(Q["advisory_unlock"], key)
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

        async def work(conn: Connection) -> int:
            stored = await conn.fetch(
                "insert_events",
                *columns,
                int(time.time()),
                [e.plan for e in batch],
                [e.plan_issued_at for e in batch],
            )
            if not stored:
                return 0
            pks = {(r["source"], r["event_id"]): r["id"] for r in stored}
            values: list[tuple[int, str, str, int, int]] = []
            dirty: set[tuple[str, int]] = set()
            fresh = [e for e in batch if (e.source, e.event_id) in pks]
            check_batch_alone(fresh, bucket_seconds)
            await self._store_points(conn, fresh, bucket_seconds)
            added = bucket_sums(fresh, bucket_seconds)
            for e in fresh:
                pk = pks[(e.source, e.event_id)]
                bucket = bucket_of(e.time_ms, bucket_seconds)
                dirty.add((e.org_id, bucket))
                values.extend((pk, meter, e.org_id, bucket, micros) for meter, micros in e.values)
            if values:
                pk_col, meter_col, org_col, bucket_col, micros_col = zip(*values, strict=True)
                await conn.execute(
                    "insert_meter_values", pk_col, meter_col, org_col, bucket_col, micros_col
                )
                totals = await conn.fetch(
                    "add_bucket_totals", org_col, bucket_col, meter_col, micros_col
                )
                # refused whole when a total passed the bound on the way: the transaction
                # rolls back
                before = {
                    (o, m, b): t - added[(o, m, b)]
                    for o, m, b, t in (
                        (r["org_id"], r["meter"], r["bucket_start"], r["micros"]) for r in totals
                    )
                }
                check_bucket_bound(fresh, bucket_seconds, before)
            marks = sorted(dirty)
            await conn.execute("mark_dirty", [o for o, _ in marks], [b for _, b in marks])
            return len(stored)

        accepted = await self._tx("ingest", work) if batch else 0
        return IngestResult(accepted=accepted, duplicates=len(events) - accepted)

    async def _store_points(
        self, conn: Connection, events: Sequence[StoredEvent], bucket_seconds: int
    ) -> None:
        """Gauge points, after their series' rows are locked (see migration 0006): a
        derivation holding a series sees every point numbered below those it does not."""
        rows = [
            (p.meter, e.org_id, p.series, e.time_ms, point_order(e), p.mode, p.value, p.fields)
            for e in events
            for p in e.points
        ]
        if rows:
            await conn.bulk("touch_gauge_series", gauge_touches(events, bucket_seconds))
            await conn.bulk("insert_gauge_point", rows)

    # rollup -------------------------------------------------------------------------------

    async def _take_dirty(
        self,
        conn: Connection,
        last_start: int,
        org_id: str | None,
        limit: int,
        allowed: list[str] | None,
    ) -> DirtyBatch:
        """Read the closed dirty buckets with their marks: a mark an ingest renewed meanwhile
        is neither held nor cleared."""
        dirty = await conn.fetch("closed_dirty", last_start, org_id, limit, allowed)
        orgs = [r["org_id"] for r in dirty]
        starts = [r["bucket_start"] for r in dirty]
        marks = [r["mark"] for r in dirty]
        return DirtyBatch(
            buckets=len(dirty),
            bucket_args=(orgs, starts),
            org_args=(sorted(set(orgs)),),
            clear_args=(orgs, starts, marks),
            marks=dict(zip(zip(orgs, starts, strict=True), marks, strict=True)),
        )

    # parity -------------------------------------------------------------------------------

    async def usage_by_org(self, meter: str, start: int, end: int) -> dict[str, int]:
        rows = await self._all("usage_by_org", meter, start, end)
        return {r["org_id"]: int(r["micros"]) for r in rows}


class _Migrations(migrations.Session):
    """The migration runner's session on one pooled connection (the migrate lock held)."""

    def __init__(self, conn: Conn, errors: type[BaseException]) -> None:
        self.conn = conn
        self.errors = (errors,)

    async def applied(self) -> dict[str, str]:
        await self.conn.execute(Q["create_schema_migrations"])
        rows = await self.conn.fetch(Q["schema_migrations"])
        return {r["name"]: r["checksum"] for r in rows}

    async def apply(self, migration: migrations.Migration, at: int) -> None:
        async with self.conn.transaction():
            await self.conn.execute(migration.sql)
            await self.conn.execute(Q["record_migration"], migration.name, migration.checksum, at)


async def _backoff(attempt: int) -> None:
    """Full jitter, doubling from 50 ms, capped at 2 s."""
    await asyncio.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))


spec = PluginSpec(
    kind="storage", name="postgres", config=PostgresStorageConfig, factory=PostgresStorage
)
