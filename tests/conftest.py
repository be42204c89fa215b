"""Shared fixtures: configs on a temporary SQLite file, a started ControlPlane, free ports."""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from controlplane import config as config_mod
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.plugins.billing.fake import FakeBilling

TOKEN = "cp_test_token"
READ_TOKEN = "cp_test_read_only"
HOUR = 3600
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a bucket boundary


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def raw_config(db: Path, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "storage": {"backend": "sqlite", "path": str(db), "synchronous": "normal"},
        "auth": {
            "tokens": [
                {
                    "name": "tester",
                    "sha256": token_hash(TOKEN),
                    "scopes": ["ingest", "read", "admin", "parity"],
                },
                {"name": "reader", "sha256": token_hash(READ_TOKEN), "scopes": ["read"]},
            ]
        },
        "rollup": {"bucket_seconds": HOUR, "grace_seconds": 600},
        "meters": [
            {
                "name": "gbs",
                "event_type": "tick",
                "value": "data.mb * data.s / 1024",
                "where": "data.mb > 0",
                "event_name": "memory_gb_seconds",
            },
            {"name": "calls", "event_type": "call", "aggregation": "count"},
        ],
    }
    raw.update(sections)
    return raw


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs a CLI command configures logging (warnings only, by default): put
    back what the next test's `capture_logs()` expects."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def make_config(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Config]:
    """Configs on a fresh SQLite file; with CP_TEST_STORAGE=postgres, on a fresh PostgreSQL
    database instead (every test using this fixture then runs against PostgreSQL)."""
    storage: dict[str, Any] | None = None
    if os.environ.get("CP_TEST_STORAGE") == "postgres":
        from tests.harness import fresh_database

        storage = {
            "backend": "postgres",
            "dsn": fresh_database(request.getfixturevalue("postgres_dsn")),
        }

    def make(**sections: Any) -> Config:
        raw = raw_config(tmp_path / "cp.db", **sections)
        if storage is not None and "storage" not in sections:
            raw["storage"] = storage
        return config_mod.parse(raw)

    return make


@pytest.fixture
def clock() -> list[float]:
    """A settable clock: `clock[0] = t` moves time for the ControlPlane built by `cp`."""
    return [float(T0 + 10 * HOUR)]


@pytest.fixture
def fake_billing() -> FakeBilling:
    return FakeBilling()


@pytest.fixture
async def cp(
    make_config: Callable[..., Config], clock: list[float], fake_billing: FakeBilling
) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(make_config(), billing=fake_billing, clock=lambda: clock[0]) as plane:
        yield plane


def tick(
    event_id: str, org: str, at: int, mb: int = 1024, s: int = 20, **extra: Any
) -> dict[str, Any]:
    """A usage tick worth mb*s/1024 GB-seconds at unix second `at`."""
    return {
        "id": event_id,
        "type": "tick",
        "subject": org,
        "ts": at * 1000,
        "data": {"mb": mb, "s": s},
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service(name: str, driver: str, extra: str, server: Any) -> Iterator[str]:
    """Start a harness server for the session, or explain why not: locally, tests needing it
    are skipped with the reason; in CI (CI=true) they fail: a green CI must mean they ran."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    try:
        importlib.import_module(driver)
    except ImportError:
        reason = f"{driver} is not installed: pip install -e '.[dev,{extra}]'"
        if in_ci:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        address = server.start()
    except RuntimeError as exc:  # PostgresUnavailable, RedisUnavailable
        if in_ci:
            pytest.fail(f"{name} is required in CI and did not start: {exc}")
        pytest.skip(f"{name} unavailable: {exc}")
    try:
        yield address
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A real PostgreSQL server on loopback for the session (see tests/harness.py)."""
    from tests.harness import PostgresServer

    yield from _service("PostgreSQL", "asyncpg", "postgres", PostgresServer())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis server on loopback for the session (see tests/harness.py)."""
    from tests.harness import RedisServer

    yield from _service("Redis", "redis", "redis", RedisServer())
