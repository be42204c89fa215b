"""The storage contract suite's fixtures: every test runs once per storage plugin.

`store` is one empty store of the parametrised backend (a SQLite file, or a fresh PostgreSQL
database created for the test and dropped after it); `await store.open()` gives another started
handle on it, as a second replica would have. `storage` is a started, migrated handle.

Plugins are imported lazily, inside the fixture, so one backend's missing module or driver
fails only its own parameter.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from controlplane.interfaces import Storage

BACKENDS = ["sqlite", "postgres"]


class Store:
    """One store under test: the backend's name, and handles opened on it."""

    def __init__(self, name: str, make: Callable[[], Storage]) -> None:
        self.name = name
        self._make = make
        self._open: list[Storage] = []

    async def open(self, *, migrate: bool = False) -> Storage:
        """Start (and optionally migrate) a new handle on the same store."""
        storage = self._make()
        await storage.start()
        self._open.append(storage)
        if migrate:
            await storage.migrate()
        return storage

    async def close(self) -> None:
        for storage in reversed(self._open):
            with contextlib.suppress(Exception):
                await storage.close()
        self._open.clear()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend's name; for PostgreSQL, also makes sure the session's server runs.

    (A sync fixture: the server is started with `asyncio.run`, outside the test's loop.)"""
    name: str = request.param
    if name == "postgres":
        request.getfixturevalue("postgres_dsn")
    return name


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def _postgres_database(server_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    import asyncpg

    name = f"cp_{uuid.uuid4().hex}"
    admin = _with_database(server_dsn, "postgres")
    conn = await asyncpg.connect(admin, timeout=30)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield _with_database(server_dsn, name)
    finally:
        conn = await asyncpg.connect(admin, timeout=30)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
async def store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Store]:
    if backend == "sqlite":
        from controlplane.plugins.storage.sqlite import SQLiteStorage, SQLiteStorageConfig

        config = SQLiteStorageConfig(path=str(tmp_path / "cp.db"), synchronous="normal")
        handle = Store("sqlite", lambda: SQLiteStorage(config))
        try:
            yield handle
        finally:
            await handle.close()
        return

    from controlplane.plugins.storage.postgres import PostgresStorage, PostgresStorageConfig

    server_dsn: str = request.getfixturevalue("postgres_dsn")
    async with _postgres_database(server_dsn) as dsn:
        pg_config = PostgresStorageConfig(dsn=dsn)
        handle = Store("postgres", lambda: PostgresStorage(pg_config))
        try:
            yield handle
        finally:
            await handle.close()


@pytest.fixture
async def storage(store: Store) -> Storage:
    """A started and migrated handle on an empty store (closed with the store)."""
    return await store.open(migrate=True)
