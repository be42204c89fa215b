"""The legacy biller's own database, read with configured SQL queries.

    [legacy]
    backend = "sql"
    dsn = { env = "LEGACY_DSN" }     # postgresql://... (asyncpg) or sqlite:///path/to.db
    query = "SELECT org_id, sum(...) FROM ... WHERE ... :start ... :end GROUP BY org_id"

`query` takes `:start` and `:end` (unix seconds, the window [start, end)) and returns rows of
(org id, value). Optional: `billed_until_query` (one value: unix seconds or a timestamptz, null
when nothing is billed yet) and `plan_query` (takes `:org`, returns the plan; no row when the
legacy biller does not know the org), and `invoices_query` (takes `:start` and `:end`, the billing
period; returns (org id, total) rows, or (org id, line description, amount) rows whose amounts
add up to the org's total; amounts in whole minor units, e.g. cents). Queries run in a
read-only transaction; values must be exact (integer, numeric or decimal text), never binary
floats.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Mapping
from decimal import Decimal
from pathlib import PurePath
from typing import Any

import aiosqlite

from controlplane.config import LegacyPluginConfig
from controlplane.errors import ConfigError
from controlplane.interfaces import (
    CapabilityUnavailable,
    LegacyCapability,
    LegacyError,
    LegacyInvoice,
    LegacySource,
)
from controlplane.plugins.legacy._common import collect, invoices_from_rows, unix_seconds
from controlplane.registry import PluginSpec, require
from controlplane.secrets import Secret, check_url, reveal

_PARAM = re.compile(r"(?<![:\w]):(start|end|org)\b")


class SQLLegacyConfig(LegacyPluginConfig, tag="sql", tag_field="backend", frozen=True):
    dsn: Secret
    query: str
    billed_until_query: str | None = None
    plan_query: str | None = None
    invoices_query: str | None = None
    timeout_seconds: float = 30.0


def positional(query: str) -> tuple[str, list[str]]:
    """`query` with `:name` parameters turned into `$1, $2, ...` (PostgreSQL), and the names
    in order of their numbers."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    return _PARAM.sub(number, query), order


def _uses(query: str) -> set[str]:
    return set(_PARAM.findall(query))


class SQLLegacySource(LegacySource):
    name = "sql"

    def __init__(self, config: SQLLegacyConfig) -> None:
        missing = {"start", "end"} - _uses(config.query)
        if missing:
            raise ConfigError(
                f"legacy.query: must use :start and :end (the window); missing "
                f"{', '.join(':' + m for m in sorted(missing))}"
            )
        if config.plan_query is not None and "org" not in _uses(config.plan_query):
            raise ConfigError("legacy.plan_query: must use :org")
        if config.invoices_query is not None and {"start", "end"} - _uses(config.invoices_query):
            raise ConfigError("legacy.invoices_query: must use :start and :end (the period)")
        if config.timeout_seconds <= 0:
            raise ConfigError("legacy.timeout_seconds: must be > 0")
        self.config = config
        self._pool: Any = None  # asyncpg.Pool
        self._sqlite: aiosqlite.Connection | None = None
        self._sqlite_uri: str | None = None

    # lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        dsn = reveal(self.config.dsn, "legacy.dsn")
        scheme = dsn.split(":", 1)[0].lower()
        if scheme in ("postgres", "postgresql"):
            check_url(dsn, "legacy.dsn")
            asyncpg = require("asyncpg", "legacy.sql", "postgres")
            # min_size=0: no connection until the first query, so a legacy database that is
            # down does not stop the control plane from starting.
            self._pool = await asyncpg.create_pool(
                dsn, min_size=0, max_size=2, command_timeout=self.config.timeout_seconds
            )
        elif scheme == "sqlite":
            path = dsn.split(":", 1)[1]
            if path.startswith("//"):  # sqlite:///abs/path (empty authority); sqlite:rel/path
                path = "/" + path.lstrip("/")
            if not path.strip("/"):
                raise ConfigError("legacy.dsn: sqlite:///path/to/file.db")
            absolute = os.path.abspath(path)  # noqa: ASYNC240 - one getcwd, at startup
            self._sqlite_uri = PurePath(absolute).as_uri() + "?mode=ro"
        else:
            raise ConfigError(
                "legacy.dsn: expected postgresql://... or sqlite:///path (scheme "
                f"{scheme!r} is not supported)"
            )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        if self._sqlite is not None:
            conn, self._sqlite = self._sqlite, None
            await conn.close()

    # queries ------------------------------------------------------------------------------

    async def _fetch(self, query: str, params: Mapping[str, Any], what: str) -> list[Any]:
        if self._pool is not None:
            return await self._fetch_postgres(query, params, what)
        if self._sqlite_uri is not None:
            return await self._fetch_sqlite(query, params, what)
        raise LegacyError("legacy source is not started")

    async def _fetch_postgres(self, query: str, params: Mapping[str, Any], what: str) -> list[Any]:
        text, names = positional(query)
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                rows = await conn.fetch(
                    text, *(params[n] for n in names), timeout=self.config.timeout_seconds
                )
        except (OSError, TimeoutError) as exc:
            raise LegacyError(f"legacy database unreachable ({what}): {exc}") from exc
        except Exception as exc:  # asyncpg.PostgresError and friends
            raise LegacyError(f"legacy {what} failed: {type(exc).__name__}: {exc}") from exc
        return [tuple(r) for r in rows]

    async def _fetch_sqlite(self, query: str, params: Mapping[str, Any], what: str) -> list[Any]:
        try:
            if self._sqlite is None:
                self._sqlite = await aiosqlite.connect(
                    self._sqlite_uri or "", uri=True, isolation_level=None
                )
            async with self._sqlite.execute(query, dict(params)) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            if self._sqlite is not None:
                conn, self._sqlite = self._sqlite, None
                await conn.close()
            raise LegacyError(f"legacy {what} failed: {exc}") from exc

    async def usage(self, start: int, end: int) -> dict[str, Decimal]:
        rows = await self._fetch(self.config.query, {"start": start, "end": end}, "query")
        for i, row in enumerate(rows):
            if len(row) != 2:
                raise LegacyError(f"legacy query row {i}: expected (org id, value), got {row!r}")
        return collect(rows, "legacy query")

    def capabilities(self) -> frozenset[LegacyCapability]:
        found = set()
        if self.config.billed_until_query:
            found.add(LegacyCapability.BILLED_UNTIL)
        if self.config.plan_query:
            found.add(LegacyCapability.PLAN)
        if self.config.invoices_query:
            found.add(LegacyCapability.INVOICES)
        return frozenset(found)

    async def billed_until(self) -> int | None:
        if not self.config.billed_until_query:
            raise CapabilityUnavailable(
                self.name, LegacyCapability.BILLED_UNTIL, "set legacy.billed_until_query"
            )
        rows = await self._fetch(self.config.billed_until_query, {}, "billed_until_query")
        if len(rows) != 1 or len(rows[0]) != 1:
            raise LegacyError(f"legacy billed_until_query: expected one value, got {rows!r:.200}")
        return unix_seconds(rows[0][0], "legacy billed_until_query")

    async def plan(self, org_id: str) -> str | None:
        if not self.config.plan_query:
            raise CapabilityUnavailable(self.name, LegacyCapability.PLAN, "set legacy.plan_query")
        rows = await self._fetch(self.config.plan_query, {"org": org_id}, "plan_query")
        if not rows:
            return None
        value = rows[0][0]
        if value is not None and not isinstance(value, str):
            raise LegacyError(f"legacy plan_query: expected text, got {value!r}")
        return value

    async def invoices(self, start: int, end: int) -> dict[str, LegacyInvoice]:
        if not self.config.invoices_query:
            raise CapabilityUnavailable(
                self.name, LegacyCapability.INVOICES, "set legacy.invoices_query"
            )
        params = {"start": start, "end": end}
        rows = await self._fetch(self.config.invoices_query, params, "invoices_query")
        return invoices_from_rows(rows, "legacy invoices_query")


spec = PluginSpec(kind="legacy", name="sql", config=SQLLegacyConfig, factory=SQLLegacySource)
