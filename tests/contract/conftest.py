"""The storage contract suite's fixtures: every test runs once per storage plugin, each named
once in :data:`BACKENDS`.

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
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import pytest

from controlplane.interfaces import Storage


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


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


Make = Callable[[], Storage]


@contextlib.asynccontextmanager
async def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """A SQLite file in the test's folder."""
    from controlplane.plugins.storage.sqlite import SQLiteStorage, SQLiteStorageConfig

    config = SQLiteStorageConfig(path=str(tmp_path / "cp.db"), synchronous="normal")
    yield lambda: SQLiteStorage(config)


@contextlib.asynccontextmanager
async def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """A fresh, empty database on the session's server, dropped afterwards."""
    import asyncpg

    from controlplane.plugins.storage.postgres import PostgresStorage, PostgresStorageConfig

    server_dsn: str = request.getfixturevalue("postgres_dsn")
    name = f"cp_{uuid.uuid4().hex}"
    admin = _with_database(server_dsn, "postgres")
    conn = await asyncpg.connect(admin, timeout=30)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    config = PostgresStorageConfig(dsn=_with_database(server_dsn, name))
    try:
        yield lambda: PostgresStorage(config)
    finally:
        conn = await asyncpg.connect(admin, timeout=30)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


class Backend(NamedTuple):
    """A storage plugin under test: how to get an empty store of it, and the session fixture
    (a server) it needs started first, outside the test's event loop."""

    name: str
    empty_store: Callable[
        [pytest.FixtureRequest, Path], contextlib.AbstractAsyncContextManager[Make]
    ]
    server: str | None = None


BACKENDS = [  # every storage plugin; a new one is one entry here
    Backend("sqlite", _sqlite),
    Backend("postgres", _postgres, server="postgres_dsn"),
]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The backend under test; makes sure the server it needs runs.

    (A sync fixture: a server is started with `asyncio.run`, outside the test's loop.)"""
    chosen: Backend = request.param
    if chosen.server:
        request.getfixturevalue(chosen.server)
    return chosen


@pytest.fixture
async def store(
    backend: Backend, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Store]:
    async with backend.empty_store(request, tmp_path) as make:
        handle = Store(backend.name, make)
        try:
            yield handle
        finally:
            await handle.close()


@pytest.fixture
async def storage(store: Store) -> Storage:
    """A started and migrated handle on an empty store (closed with the store)."""
    return await store.open(migrate=True)
