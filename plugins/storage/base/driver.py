"""The driver contract a SQL storage plugin implements (procrastinate's connector), and
the shared methods of the storage lifecycle over it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple, TypeVar

from controlplane import audit as audit_chain
from controlplane import migrations
from controlplane.errors import ConfigError
from controlplane.interfaces import AuditEntry, MigrationStatus, SeamRows
from controlplane.interfaces.storage import StorageLifecycle

T = TypeVar("T")
Row = Any  # a driver row: read by column name (sqlite3.Row, asyncpg.Record)

CHAIN_LOCK = "rounding-chains"
CLAIM_LOCK = "sender-claims"
AUDIT_LOCK = "audit-chain"
FLAGS_LOCK = "flags"


class Connection(abc.ABC):
    """One driver connection, in a transaction or a read; queries are named, never SQL text."""

    @abc.abstractmethod
    async def fetch(self, query: str, *args: Any) -> list[Row]:
        """Every row the named query returns."""

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        rows = await self.fetch(query, *args)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: Any) -> Any:
        row = await self.fetchrow(query, *args)
        return None if row is None else row[0]

    @abc.abstractmethod
    async def execute(self, query: str, *args: Any) -> None: ...

    @abc.abstractmethod
    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        """The named statement once per row of arguments."""

    @abc.abstractmethod
    async def bulk(self, query: str, rows: Sequence[Sequence[Any]], *args: Any) -> None:
        """The named statement over `rows`: its arguments are a row's values, then `args`
        (the dialect runs it once per row, or once with each column as an array). Nothing
        runs without rows."""

    @abc.abstractmethod
    async def lock(self, name: str, *, shared: bool = False) -> None:
        """Hold the lock `name` (`shared` with other shared holders) until the transaction
        ends; a store that runs one write transaction at a time has nothing to do."""


class DirtyBatch(NamedTuple):
    """The dirty buckets one rollup step took, as the dialect passes them to its queries."""

    buckets: int  # how many were taken
    bucket_args: tuple[Any, ...] = ()  # of `batch_totals` and `batch_ledger`
    org_args: tuple[Any, ...] = ()  # of `batch_carries` and `batch_orgs`
    clear_args: tuple[Any, ...] = ()  # of `clear_dirty`
    marks: Mapping[tuple[str, int], int] = {}  # the mark read per (org, bucket), if any


async def read_seam(conn: Connection, bucket_start: int) -> SeamRows:
    (row,) = await conn.fetch("seam", bucket_start)
    return SeamRows(reached=int(row["reached"]), excluded_before_bill_from=int(row["excluded"]))


async def read_flag_versions(conn: Connection) -> dict[str, int]:
    return {r["name"]: r["version"] for r in await conn.fetch("flag_versions")}


class SQLDriver(StorageLifecycle):
    """The driver contract every shared method stands on, and the schema methods over it."""

    sign: Callable[[str], str] | None

    @abc.abstractmethod
    async def _tx(self, what: str, work: Callable[[Connection], Awaitable[T]], *locks: str) -> T:
        """Run `work` in one write transaction (after taking `locks`, in order): all of it
        commits, or none of it. Driver errors become StorageError naming `what`."""

    @abc.abstractmethod
    async def _read(self, what: str, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` on a connection for reading, outside any write transaction."""

    @abc.abstractmethod
    def _array(self, values: Sequence[Any]) -> Any:
        """A list as one query parameter."""

    @abc.abstractmethod
    def _migrating(self) -> AbstractAsyncContextManager[migrations.Session]:
        """A migration session, alone among every process sharing the store."""

    async def _all(self, query: str, *args: Any) -> list[Row]:
        """The rows of one named read."""
        return await self._read("read", lambda conn: conn.fetch(query, *args))

    async def migrate(self) -> list[str]:
        async with self._migrating() as session:
            return await migrations.migrate(session, self.name)

    async def migration_status(self) -> MigrationStatus:
        async with self._migrating() as session:
            applied, pending = await migrations.status(session, self.name)
        return MigrationStatus(applied=applied, pending=pending)

    async def ping(self) -> None:
        await self._all("ping")

    async def pin_setting(self, key: str, value: str) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute("put_setting", key, value)  # unless one is there
            pinned = await conn.fetchval("get_setting", key)
            if pinned != value:
                raise ConfigError(
                    f"rollup.{key}: the data was written with {key} = {pinned}; "
                    f"it cannot change to {value}"
                )

        await self._tx("pin setting", work)

    async def _append_audit(self, conn: Connection, entries: Sequence[AuditEntry], at: int) -> None:
        if not entries:
            return
        await conn.lock(AUDIT_LOCK)
        prev = await conn.fetchval("last_audit_hash") or audit_chain.GENESIS
        await conn.executemany("insert_audit", audit_chain.chain_rows(prev, at, entries, self.sign))
