"""SQLite storage: the embedded default. One file, WAL, one writer.

Every write runs under one asyncio lock on one connection (``BEGIN IMMEDIATE`` ... ``COMMIT``);
reads use a second connection, which WAL lets run alongside the writer. `synchronous = FULL`
by default, so an acknowledged batch survives a crash of the process or the machine.

The storage methods are :class:`~controlplane.plugins.storage.base.SQLStorage`'s; this module
is the dialect (`sqlite.sql`, numbered ``?N`` parameters, lists as JSON arrays, one statement
per row in bulk) and the driver (aiosqlite). One writer at a time needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import msgspec

from controlplane import migrations, sql
from controlplane.errors import ConfigError, NoDatabase, StorageError
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
from controlplane.registry import PluginSpec
from controlplane.units import MICROS

Q = sql.load(__package__ or "", "sqlite.sql")
T = TypeVar("T")
_json = msgspec.json.Encoder()
_org_totals = msgspec.json.Decoder(dict[str, tuple[int, int]])


class SQLiteStorageConfig(StorageConfig, tag="sqlite", tag_field="backend", frozen=True):
    path: str = "controlplane.db"
    synchronous: Literal["full", "normal"] = "full"
    busy_timeout_ms: int = 10_000

    def where(self) -> str:
        return self.path


class SQLiteConnection(Connection):
    """An aiosqlite connection running `sqlite.sql`'s queries."""

    def __init__(self, raw: aiosqlite.Connection) -> None:
        self.raw = raw

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        async with self.raw.execute(Q[query], args) as cur:
            return list(await cur.fetchall())

    async def execute(self, query: str, *args: Any) -> None:
        async with self.raw.execute(Q[query], args):
            pass

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.raw.executemany(Q[query], rows)

    async def bulk(self, query: str, rows: Sequence[Sequence[Any]], *args: Any) -> None:
        if rows:
            await self.raw.executemany(Q[query], [(*row, *args) for row in rows])

    async def lock(self, name: str, *, shared: bool = False) -> None:
        """Nothing to take: the writer's lock already runs one write transaction at a time."""


class SQLiteStorage(SQLStorage):
    name = "sqlite"

    def __init__(self, config: SQLiteStorageConfig) -> None:
        self.config = config
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._existing = f"{Path(config.path).resolve().as_uri()}?mode=rw"  # never creates

    # lifecycle ----------------------------------------------------------------------------

    async def _connect(self, create: bool) -> aiosqlite.Connection:
        path = self.config.path
        if create:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        else:  # an existing file only: SQLite's `mode=rw` never creates one
            conn = await aiosqlite.connect(self._existing, uri=True, isolation_level=None)
        conn.row_factory = sqlite3.Row  # read by column name
        await conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_ms)}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
        await conn.execute("PRAGMA foreign_keys = ON")
        # The rollup's batch tables and the sorts of large reads stay off the disk.
        await conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    async def start(self, *, create: bool = True) -> None:
        if self.config.path == ":memory:":
            raise ConfigError("storage.path: ':memory:' cannot be shared by reader and writer")
        if not create and not self._exists():  # a stat: no connection thread to clean up
            raise NoDatabase(f"no database at {self.config.path}")
        try:
            self._writer = await self._connect(create)
            self._reader = await self._connect(create)
        except sqlite3.Error as exc:
            if not create:
                raise NoDatabase(f"no database at {self.config.path}") from exc
            raise StorageError(f"cannot open SQLite database {self.config.path}: {exc}") from exc

    def _exists(self) -> bool:
        return Path(self.config.path).is_file()

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

    # the driver contract ------------------------------------------------------------------

    async def _tx(self, what: str, work: Callable[[Connection], Awaitable[T]], *locks: str) -> T:
        """One write transaction under the writer's lock (which serializes every write, so
        `locks` need nothing more): all of it commits, or none of it."""
        async with self._write_lock:
            conn = self._w
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot begin a write transaction: {exc}") from exc
            try:
                result = await work(SQLiteConnection(conn))
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"{what} failed: {exc}") from exc
                raise
            try:
                await conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise StorageError(f"commit failed: {exc}") from exc
            return result

    async def _read(self, what: str, work: Callable[[Connection], Awaitable[T]]) -> T:
        try:
            return await work(SQLiteConnection(self._r))
        except sqlite3.Error as exc:
            raise StorageError(f"{what} failed: {exc}") from exc

    def _array(self, values: Sequence[Any]) -> str:
        return _json.encode(list(values)).decode()  # read with json_each()

    def _series_keys(self, columns: list[list[Any]]) -> tuple[Any, ...]:
        """One JSON array of [meter, org, series, from] (read by position, no json_each
        joined to another on its keys: that compares every pair)."""
        return (self._array([list(key) for key in zip(*columns, strict=True)]),)

    @contextlib.asynccontextmanager
    async def _migrating(self) -> AsyncIterator[migrations.Session]:
        async with self._write_lock:
            yield _Migrations(self._w)

    # ingest -------------------------------------------------------------------------------

    async def insert_events(
        self, events: Sequence[StoredEvent], bucket_seconds: int
    ) -> IngestResult:
        keys = self._array([[e.source, e.event_id] for e in events])
        now = int(time.time())

        async def work(conn: Connection) -> int:
            existing = {(r[0], r[1]) for r in await conn.fetch("existing_events", keys)}
            next_pk = int(await conn.fetchval("max_event_pk")) + 1
            event_rows = []
            value_rows = []
            point_rows = []
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
                        e.plan,
                        e.plan_issued_at,
                    )
                )
                for meter, micros in e.values:
                    value_rows.append((next_pk, meter, e.org_id, bucket, micros))
                order = point_order(e)
                for p in e.points:
                    point_rows.append(
                        (
                            p.meter,
                            e.org_id,
                            p.series,
                            e.time_ms,
                            order,
                            next_pk,
                            p.mode,
                            p.value,
                            p.fields,
                        )
                    )
                dirty.add((e.org_id, bucket))
                fresh.append(e)
                next_pk += 1
            if event_rows:
                check_batch_alone(fresh, bucket_seconds)
                await conn.executemany("insert_event", event_rows)
                await conn.executemany("insert_meter_value", value_rows)
                await conn.executemany("mark_dirty", sorted(dirty))
                if point_rows:
                    await conn.bulk("touch_gauge_series", gauge_touches(fresh, bucket_seconds))
                    await conn.bulk("insert_gauge_point", point_rows)
                await self._check_totals(conn, fresh, bucket_seconds)
            return len(event_rows)

        accepted = await self._tx("ingest", work)
        return IngestResult(accepted=accepted, duplicates=len(events) - accepted)

    async def _check_totals(
        self, conn: Connection, events: list[StoredEvent], bucket_seconds: int
    ) -> None:
        """Refuse the batch (InvalidInput, the transaction rolls back) when it took a bucket
        total past the bound on the way, event by event: name the event that did."""
        added = bucket_sums(events, bucket_seconds)
        rows = await conn.fetch("bucket_totals_of", self._array(list(added)))
        after = {(r["org_id"], r["meter"], r["bucket_start"]): r["micros"] for r in rows}
        before = {key: total - added[key] for key, total in after.items()}
        check_bucket_bound(events, bucket_seconds, before)

    # rollup -------------------------------------------------------------------------------

    async def _take_dirty(
        self,
        conn: Connection,
        last_start: int,
        org_id: str | None,
        limit: int,
        allowed: list[str] | None,
    ) -> DirtyBatch:
        """Fill the temporary batch tables the `batch_*` queries and `clear_dirty` read."""
        assert isinstance(conn, SQLiteConnection)
        for name in ("create_batch", "create_batch_meters", "clear_batch"):
            await conn.execute(name)
        params = {
            "last_start": last_start,
            "org": org_id,
            "limit": limit,
            "allowed": None if allowed is None else self._array(allowed),
        }
        async with conn.raw.execute(Q["fill_batch"], params) as cur:
            buckets = cur.rowcount
        if buckets:
            await conn.execute("clear_batch_meters")
            await conn.execute("fill_batch_meters")
        return DirtyBatch(buckets=buckets)

    # parity -------------------------------------------------------------------------------

    async def usage_by_org(self, meter: str, start: int, end: int) -> dict[str, int]:
        ((first, last),) = await self._all("bucket_span", meter)
        if first is None or end <= first or start > last:
            return {}
        # Read the window's rows through the bucket index when it covers at most an eighth of
        # the meter's history (the checker's single bucket), else scan the history in key
        # order: each costs about the same at that ratio (see docs/benchmarks.md).
        narrow = (min(end, last + 1) - max(start, first)) * 8 <= last - first
        query = Q["usage_by_org_narrow" if narrow else "usage_by_org"]

        async def read(conn: Connection) -> Any:
            assert isinstance(conn, SQLiteConnection)
            params = {"meter": meter, "start": start, "end": end}
            async with conn.raw.execute(query, params) as cur:
                row = await cur.fetchone()
            return row[0] if row else None

        totals = await self._read("usage by org", read)
        if not totals:
            return {}
        return {
            org: units * MICROS + micros
            for org, (units, micros) in _org_totals.decode(totals).items()
        }


class _Migrations(migrations.Session):
    """The migration runner's session on the writer's connection (its lock held)."""

    errors = (sqlite3.Error,)

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def applied(self) -> dict[str, str]:
        await self.conn.execute(Q["create_schema_migrations"])
        async with self.conn.execute(Q["schema_migrations"]) as cur:
            return {r["name"]: r["checksum"] for r in await cur.fetchall()}

    async def apply(self, migration: migrations.Migration, at: int) -> None:
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(migration.sql):
                await self.conn.execute(statement)
            await self.conn.execute(Q["record_migration"], (migration.name, migration.checksum, at))
            await self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await self.conn.execute("ROLLBACK")
            raise


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
