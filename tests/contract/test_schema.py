"""Lifecycle, migrations, pinned settings and job exclusivity, on every storage plugin."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.errors import ConfigError, StorageError
from controlplane.interfaces import Storage
from tests.contract.conftest import Store
from tests.contract.helpers import HOUR, B, event


async def test_migrate_applies_every_migration_once(store: Store) -> None:
    storage = await store.open()
    fresh = await storage.migration_status()
    assert fresh.applied == [] and fresh.pending and not fresh.current

    applied = await storage.migrate()
    assert applied == fresh.pending
    status = await storage.migration_status()
    assert status.current and status.pending == []
    assert sorted(status.applied) == sorted(applied)

    assert await storage.migrate() == []
    assert await storage.migration_status() == status
    other = await store.open()  # another replica sees the same schema
    assert await other.migrate() == []
    assert (await other.migration_status()).current


async def test_migrating_again_keeps_the_data(store: Store, storage: Storage) -> None:
    await storage.insert_events([event("e1", "a", B[0], 5)], HOUR)
    again = await store.open()
    assert await again.migrate() == []
    assert [t.value_micros for t in await again.usage("a", None, None, None)] == [5]


async def test_ping_answers_until_closed_and_close_is_idempotent(store: Store) -> None:
    storage = await store.open(migrate=True)
    await storage.ping()
    await storage.close()
    await storage.close()
    with pytest.raises(StorageError):
        await storage.ping()


async def test_pin_setting_refuses_a_changed_value(store: Store, storage: Storage) -> None:
    await storage.pin_setting("bucket_seconds", "3600")
    await storage.pin_setting("bucket_seconds", "3600")  # the same value again: fine
    with pytest.raises(ConfigError, match="bucket_seconds"):
        await storage.pin_setting("bucket_seconds", "60")
    await storage.pin_setting("other_key", "60")  # keys are independent

    other = await store.open()  # pinned in the store, not in the handle
    with pytest.raises(ConfigError):
        await other.pin_setting("bucket_seconds", "60")
    with pytest.raises(ConfigError):
        await other.pin_setting("other_key", "3600")
    await other.pin_setting("bucket_seconds", "3600")


async def test_exclusive_yields_true_to_a_lone_holder(storage: Storage) -> None:
    async with storage.exclusive("rollup") as held:
        assert held is True
    async with storage.exclusive("rollup") as held:  # released at the end of the block
        assert held is True
    async with storage.exclusive("rollup", wait=True) as held:
        assert held is True


async def test_exclusive_refuses_a_second_holder_among_replicas(
    store: Store, storage: Storage
) -> None:
    if storage.name != "postgres":
        pytest.skip(f"{storage.name} serves one process: it has nothing to arbitrate")
    other = await store.open()
    async with storage.exclusive("rollup") as first:
        assert first is True
        async with other.exclusive("rollup") as second:
            assert second is False
        async with other.exclusive("sender") as unrelated:
            assert unrelated is True
    async with other.exclusive("rollup") as after_release:
        assert after_release is True

    # `wait`: the second holder waits for the first to let go, then holds it.
    entered, leave = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with storage.exclusive("rollup") as held:
            assert held is True
            entered.set()
            await leave.wait()

    async def wait_for_it() -> bool:
        async with other.exclusive("rollup", wait=True) as held:
            return held

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 10)
    waiter = asyncio.create_task(wait_for_it())
    await asyncio.sleep(0.3)
    assert not waiter.done()
    leave.set()
    assert await asyncio.wait_for(waiter, 10) is True
    await holder
