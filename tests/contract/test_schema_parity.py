"""Both storage backends build one schema: the same tables, columns and indexes, but for the
differences listed here with their reasons (a dialect's own means to the same end)."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import asyncpg

from controlplane.plugins.storage.postgres import PostgresStorage, PostgresStorageConfig
from controlplane.plugins.storage.sqlite import SQLiteStorage, SQLiteStorageConfig
from tests.contract.conftest import _with_database

Schema = dict[str, set[str]]  # table -> its columns, and "index:<name>" for its indexes

ONLY_SQLITE = {
    # ingest keeps bucket_totals through triggers reading meter values by bucket
    ("meter_values", "index:meter_values_by_bucket"),
}
ONLY_POSTGRES = {
    # the rollup's step marks the dirty buckets it takes (replicas share them), by bucket
    ("dirty_buckets", "mark"),
    ("dirty_buckets", "index:dirty_buckets_by_bucket"),
    # a rounding chain's rows in order, for the row locks a step takes
    ("ledger", "index:ledger_chain"),
}


def sqlite_schema(path: Path) -> Schema:
    with sqlite3.connect(path) as db:
        tables = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        schema: Schema = {}
        for table in tables:
            columns = {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}
            indexes = {
                f"index:{row[1]}"
                for row in db.execute(f'PRAGMA index_list("{table}")')
                if row[3] == "c"  # made by CREATE INDEX, not by a key
            }
            schema[table] = columns | indexes
    return schema


async def postgres_schema(dsn: str) -> Schema:
    conn = await asyncpg.connect(dsn)
    try:
        schema: Schema = {}
        for row in await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public'"
        ):
            schema.setdefault(row["table_name"], set()).add(row["column_name"])
        for row in await conn.fetch(
            "SELECT i.tablename, i.indexname FROM pg_indexes i WHERE i.schemaname = 'public' "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
        ):
            schema[row["tablename"]].add(f"index:{row['indexname']}")
    finally:
        await conn.close()
    return schema


def without(schema: Schema, only: set[tuple[str, str]]) -> Schema:
    return {table: items - {i for t, i in only if t == table} for table, items in schema.items()}


async def test_both_backends_build_the_same_tables_columns_and_indexes(
    postgres_dsn: str, tmp_path: Path
) -> None:
    lite = SQLiteStorage(SQLiteStorageConfig(path=str(tmp_path / "cp.db")))
    await lite.start()
    await lite.migrate()
    await lite.close()
    name = f"cp_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(_with_database(postgres_dsn, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        pg = PostgresStorage(PostgresStorageConfig(dsn=_with_database(postgres_dsn, name)))
        await pg.start()
        await pg.migrate()
        await pg.close()
        postgres = await postgres_schema(_with_database(postgres_dsn, name))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    sqlite = sqlite_schema(tmp_path / "cp.db")
    assert without(sqlite, ONLY_SQLITE) == without(postgres, ONLY_POSTGRES)
