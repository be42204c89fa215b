"""Migration files follow the naming scheme; the runner refuses unknown or edited history."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controlplane import migrations
from controlplane.errors import MigrationError
from controlplane.plugins.storage.sqlite import SQLiteStorage, SQLiteStorageConfig


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_files_are_named_and_numbered(backend: str) -> None:
    found = migrations.available(backend)
    assert found, f"no migrations for {backend}"
    for i, m in enumerate(found, start=1):
        assert migrations.NAME_PATTERN.match(m.name + ".sql")
        assert m.name.startswith(f"{i:04d}_")


def test_misnamed_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sqlite").mkdir()
    (tmp_path / "sqlite" / "0001_Initial.sql").write_text("SELECT 1;")
    monkeypatch.setattr(migrations, "MIGRATIONS_ROOT", tmp_path)
    with pytest.raises(MigrationError, match=r"NNNN_lower_snake\.sql"):
        migrations.available("sqlite")


def test_gap_in_numbers_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sqlite").mkdir()
    (tmp_path / "sqlite" / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "sqlite" / "0003_c.sql").write_text("SELECT 1;")
    monkeypatch.setattr(migrations, "MIGRATIONS_ROOT", tmp_path)
    with pytest.raises(MigrationError, match="without gaps"):
        migrations.available("sqlite")


async def _storage(db: Path) -> SQLiteStorage:
    storage = SQLiteStorage(SQLiteStorageConfig(path=str(db)))
    await storage.start()
    return storage


async def test_migrate_applies_once_and_records_checksums(tmp_path: Path) -> None:
    storage = await _storage(tmp_path / "db")
    try:
        assert await storage.migrate() == [m.name for m in migrations.available("sqlite")]
        assert await storage.migrate() == []
        status = await storage.migration_status()
        assert status.current and not status.pending
    finally:
        await storage.close()


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    storage = await _storage(tmp_path / "db")
    await storage.migrate()
    await storage.close()
    with sqlite3.connect(tmp_path / "db") as conn:
        conn.execute("INSERT INTO schema_migrations VALUES ('9999_future', 'x', 0)")
    storage = await _storage(tmp_path / "db")
    try:
        with pytest.raises(MigrationError, match="newer control plane"):
            await storage.migrate()
    finally:
        await storage.close()


async def test_refuses_an_edited_migration(tmp_path: Path) -> None:
    storage = await _storage(tmp_path / "db")
    await storage.migrate()
    await storage.close()
    with sqlite3.connect(tmp_path / "db") as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE name = '0001_initial'")
    storage = await _storage(tmp_path / "db")
    try:
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await storage.migration_status()
    finally:
        await storage.close()


async def test_bucket_size_cannot_change_under_existing_data(tmp_path: Path) -> None:
    from controlplane.errors import ConfigError

    storage = await _storage(tmp_path / "db")
    try:
        await storage.migrate()
        await storage.pin_setting("bucket_seconds", "3600")
        await storage.pin_setting("bucket_seconds", "3600")
        with pytest.raises(ConfigError, match="cannot change to 60"):
            await storage.pin_setting("bucket_seconds", "60")
    finally:
        await storage.close()


class _Session(migrations.Session):
    """The runner's dialect part, in memory: what it applied, and one migration that fails."""

    errors = (RuntimeError,)

    def __init__(self, applied: dict[str, str] | None = None, failing: str = "") -> None:
        self.recorded = dict(applied or {})
        self.failing = failing
        self.runs: list[str] = []

    async def applied(self) -> dict[str, str]:
        return dict(self.recorded)

    async def apply(self, migration: migrations.Migration, at: int) -> None:
        self.runs.append(migration.name)
        if migration.name == self.failing:
            raise RuntimeError("syntax error")
        self.recorded[migration.name] = migration.checksum


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_runner_applies_each_backend_pending_files_in_order(backend: str) -> None:
    known = migrations.available(backend)
    session = _Session({known[0].name: known[0].checksum})
    assert await migrations.migrate(session, backend) == [m.name for m in known[1:]]
    assert session.runs == [m.name for m in known[1:]]
    assert await migrations.status(session, backend) == (sorted(m.name for m in known), [])
    assert await migrations.migrate(session, backend) == []


async def test_the_runner_stops_at_a_failing_migration_naming_it() -> None:
    known = migrations.available("sqlite")
    session = _Session(failing=known[1].name)
    with pytest.raises(MigrationError, match=f"migration {known[1].name} failed: syntax error"):
        await migrations.migrate(session, "sqlite")
    assert session.runs == [known[0].name, known[1].name]  # nothing after it was tried
    applied, pending = await migrations.status(session, "sqlite")
    assert applied == [known[0].name] and pending == [m.name for m in known[1:]]
