"""The PostgreSQL plugin's boundary: driver errors become StorageError, transient ones are
retried, and the DSN (which may hold a password) never appears in an error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.errors import StorageError
from tests.conftest import free_port
from tests.harness import fresh_database


@pytest.fixture
def dsn(postgres_dsn: str) -> str:
    return fresh_database(postgres_dsn)


@pytest.fixture
async def storage(dsn: str) -> AsyncIterator[Any]:
    from controlplane.plugins.storage.postgres import PostgresStorage, PostgresStorageConfig

    store = PostgresStorage(PostgresStorageConfig(dsn=dsn, retries=3))
    await store.start()
    await store.migrate()
    yield store
    await store.close()


async def test_transient_failures_are_retried_until_the_transaction_commits(storage: Any) -> None:
    import asyncpg

    calls = 0

    async def work(conn: Any) -> int:
        nonlocal calls
        calls += 1
        await conn.execute("put_setting", f"k{calls}", "v")
        if calls < 3:
            raise asyncpg.exceptions.SerializationError("could not serialize access")
        return calls

    assert await storage._tx("test", work) == 3
    # the failed attempts rolled back: only the third attempt's row is there
    assert [await storage._all("get_setting", f"k{i}") for i in (1, 2)] == [[], []]
    assert [r["value"] for r in await storage._all("get_setting", "k3")] == ["v"]


async def test_a_transient_failure_that_persists_ends_as_storage_error(storage: Any) -> None:
    import asyncpg

    async def work(conn: Any) -> None:
        raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")

    with pytest.raises(StorageError, match="test failed 3 times: deadlock detected"):
        await storage._tx("test", work)


async def test_other_driver_errors_are_not_retried(storage: Any) -> None:
    calls = 0

    async def work(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await conn.raw.execute("SELECT * FROM no_such_table")

    with pytest.raises(StorageError, match="UndefinedTableError"):
        await storage._tx("test", work)
    assert calls == 1


async def test_connection_errors_do_not_show_the_password() -> None:
    from controlplane.plugins.storage.postgres import PostgresStorage, PostgresStorageConfig

    secret = "s3cret-password"
    dsn = f"postgresql://user:{secret}@127.0.0.1:{free_port()}/db"
    store = PostgresStorage(PostgresStorageConfig(dsn=dsn, retries=2))
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL") as caught:
        await store.start()
    assert secret not in str(caught.value)


@pytest.mark.parametrize("secret", ["Sup3r/S3cret", "Xq9#Zr7", "1234/5678"])
async def test_a_dsn_that_does_not_parse_is_refused_without_showing_the_password(
    secret: str,
) -> None:
    from controlplane.errors import ConfigError
    from controlplane.plugins.storage.postgres import PostgresStorage, PostgresStorageConfig

    dsn = f"postgresql://alice:{secret}@127.0.0.1:5432/db"
    store = PostgresStorage(PostgresStorageConfig(dsn=dsn))
    with pytest.raises(ConfigError, match=r"storage.dsn: .*percent-encode") as caught:
        await store.start()
    assert secret not in str(caught.value) and caught.value.__cause__ is None
    for piece in secret.replace("#", "/").split("/"):
        assert piece not in str(caught.value)
