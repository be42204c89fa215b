"""Legacy plugins: exact values only, clipping queries on SQLite, the JSON endpoint, capabilities.

The same SQL plugin against a real PostgreSQL is in tests/integration/test_parity_postgres.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from controlplane import config as config_mod
from controlplane.errors import ConfigError
from controlplane.interfaces import CapabilityUnavailable, LegacyCapability, LegacyError
from controlplane.plugins.legacy._common import collect, exact, unix_seconds
from controlplane.plugins.legacy.http import HTTPLegacyConfig, HTTPLegacySource
from controlplane.plugins.legacy.sql import SQLLegacyConfig, SQLLegacySource, positional
from tests.harness import HTTPRecorder, Request

T0 = 1_767_225_600
H = 3600

# Sandbox runs with unix-second times; each run clipped to the window at both ends. printf
# hands the GB-seconds over as decimal text (exact here: every value has at most six decimals),
# which the plugin accepts; a bare REAL it would refuse.
SQLITE_QUERY = """
SELECT org_id,
       printf('%.6f', sum(memory_mb * (min(coalesce(ended_at, :end), :end)
                                       - max(started_at, :start))) / 1024.0)
FROM sandbox_runs
WHERE started_at < :end AND coalesce(ended_at, :end) > :start
GROUP BY org_id
"""


# values ---------------------------------------------------------------------------------------


def test_exact_accepts_integers_decimals_and_decimal_text_only() -> None:
    assert exact(3, "v") == Decimal(3)
    assert exact(Decimal("1.25"), "v") == Decimal("1.25")
    assert exact(" 2.50 ", "v") == Decimal("2.50")
    for bad, reason in [
        (1.5, "binary float"),
        (True, "expected a number"),
        (None, "expected a number"),
        ("lots", "not a number"),
        ("NaN", "not a finite number"),
        (Decimal("Infinity"), "not a finite number"),
        ([1], "expected a number"),
    ]:
        with pytest.raises(LegacyError, match=reason):
            exact(bad, "v")


def test_collect_adds_up_rows_of_the_same_org_and_refuses_bad_ids() -> None:
    assert collect([("a", 1), ("b", "2.5"), ("a", Decimal("0.25"))], "q") == {
        "a": Decimal("1.25"),
        "b": Decimal("2.5"),
    }
    assert collect([(7, 1)], "q") == {"7": Decimal(1)}
    with pytest.raises(LegacyError, match=r"q row 0, org id"):
        collect([(None, 1)], "q")
    with pytest.raises(LegacyError, match=r"q row 1 \(b\), value: got a binary float"):
        collect([("a", 1), ("b", 0.1)], "q")


def test_unix_seconds_refuses_naive_datetimes_and_fractions() -> None:
    import datetime as dt

    assert unix_seconds(dt.datetime.fromtimestamp(T0, dt.UTC), "b") == T0
    assert unix_seconds(Decimal(T0), "b") == T0
    assert unix_seconds(None, "b") is None
    with pytest.raises(LegacyError, match="naive"):
        unix_seconds(dt.datetime(2026, 1, 1), "b")
    with pytest.raises(LegacyError, match="whole unix seconds"):
        unix_seconds(Decimal("1.5"), "b")


def test_named_parameters_become_positional_for_postgres() -> None:
    text, names = positional(
        "SELECT :org, x::int FROM t WHERE a >= :start AND b < :end AND c < :end AND d = ':x'"
    )
    assert text == "SELECT $1, x::int FROM t WHERE a >= $2 AND b < $3 AND c < $3 AND d = ':x'"
    assert names == ["org", "start", "end"]


# SQL on SQLite ----------------------------------------------------------------------------------


@pytest.fixture
def legacy_db(tmp_path: Path) -> Path:
    db = tmp_path / "legacy.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE sandbox_runs (org_id TEXT, memory_mb INTEGER, started_at INTEGER,
                                       ended_at INTEGER);
            CREATE TABLE billing (billed_through INTEGER);
            CREATE TABLE accounts (id TEXT, plan TEXT);
            INSERT INTO accounts VALUES ('a', 'pro');
            """
        )
        conn.executemany(
            "INSERT INTO sandbox_runs VALUES (?, ?, ?, ?)",
            [
                ("a", 1024, T0 - 1800, T0 + 1800),  # clipped at the start: 1800
                ("a", 1024, T0 + 3000, T0 + H + 50),  # clipped at the end: 600
                ("b", 512, T0 - 60, T0 + H + 60),  # clipped at both ends: 1800
                ("c", 2048, T0 + 100, None),  # running: up to the window's end: 7000
                ("d", 4096, T0 - H, T0),  # ends at the window's start: nothing
                ("e", 4096, T0 + H, T0 + 2 * H),  # starts at its end: nothing
            ],
        )
    return db


async def _sql(**kw: Any) -> SQLLegacySource:
    source = SQLLegacySource(SQLLegacyConfig(**kw))
    await source.start()
    return source


async def test_sql_on_sqlite_clips_each_run_to_the_window(legacy_db: Path) -> None:
    source = await _sql(dsn=f"sqlite:///{legacy_db}", query=SQLITE_QUERY)
    try:
        assert await source.usage(T0, T0 + H) == {
            "a": Decimal("2400.000000"),
            "b": Decimal("1800.000000"),
            "c": Decimal("7000.000000"),
        }
        assert source.capabilities() == frozenset()
        with pytest.raises(CapabilityUnavailable, match=r"billed_until: set legacy.billed_"):
            await source.billed_until()
        with pytest.raises(CapabilityUnavailable, match="cannot tell plan"):
            await source.plan("a")
    finally:
        await source.close()


async def test_sql_capabilities_when_configured(legacy_db: Path) -> None:
    source = await _sql(
        dsn=f"sqlite:///{legacy_db}",
        query=SQLITE_QUERY,
        billed_until_query="SELECT max(billed_through) FROM billing",
        plan_query="SELECT plan FROM accounts WHERE id = :org",
    )
    try:
        assert source.capabilities() == {LegacyCapability.BILLED_UNTIL, LegacyCapability.PLAN}
        assert await source.billed_until() is None  # nothing billed yet: said, not guessed
        with sqlite3.connect(legacy_db) as conn:
            conn.execute("INSERT INTO billing VALUES (?)", (T0,))
        assert await source.billed_until() == T0
        assert await source.plan("a") == "pro"
        assert await source.plan("unknown") is None
    finally:
        await source.close()


async def test_sql_refuses_floats_and_reports_failures(legacy_db: Path) -> None:
    floats = await _sql(
        dsn=f"sqlite:///{legacy_db}",
        query="SELECT org_id, memory_mb / 1024.0 FROM sandbox_runs WHERE :start < :end",
    )
    broken = await _sql(
        dsn=f"sqlite:///{legacy_db}", query="SELECT nope FROM missing WHERE :start < :end"
    )
    try:
        with pytest.raises(LegacyError, match="binary float"):
            await floats.usage(T0, T0 + H)
        with pytest.raises(LegacyError, match="no such table: missing"):
            await broken.usage(T0, T0 + H)
    finally:
        await floats.close()
        await broken.close()


async def test_sql_opens_the_legacy_database_read_only(legacy_db: Path) -> None:
    source = await _sql(
        dsn=f"sqlite:///{legacy_db}",
        query="SELECT 'x', 1 WHERE :start < :end",
        billed_until_query="DELETE FROM sandbox_runs RETURNING 1",
    )
    try:
        with pytest.raises(LegacyError, match="readonly"):
            await source.billed_until()
    finally:
        await source.close()
    with sqlite3.connect(legacy_db) as conn:
        assert conn.execute("SELECT count(*) FROM sandbox_runs").fetchone()[0] == 6


def test_sql_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"legacy.query: must use :start and :end.*:end"):
        SQLLegacySource(SQLLegacyConfig(dsn="sqlite:///x", query="SELECT 1 WHERE :start"))
    with pytest.raises(ConfigError, match=r"legacy.plan_query: must use :org"):
        SQLLegacySource(
            SQLLegacyConfig(dsn="sqlite:///x", query=":start :end", plan_query="SELECT 1")
        )


async def test_sql_unknown_dsn_scheme_names_the_setting() -> None:
    source = SQLLegacySource(SQLLegacyConfig(dsn="mysql://x", query=":start :end"))
    with pytest.raises(ConfigError, match=r"legacy.dsn: expected postgresql"):
        await source.start()


def test_legacy_section_is_decoded_through_the_registry() -> None:
    config = config_mod.parse(
        {
            "meters": [{"name": "gbs", "event_type": "t", "value": "data.x"}],
            "parity": {"meter": "gbs"},
            "legacy": {"backend": "http", "url": "http://127.0.0.1:1/usage"},
        }
    )
    assert isinstance(config.legacy, HTTPLegacyConfig)
    with pytest.raises(ConfigError, match=r"legacy.backend: expected one of"):
        config_mod.parse({"legacy": {"backend": "oracle"}})
    with pytest.raises(ConfigError, match=r"legacy.querry: unknown setting"):
        config_mod.parse({"legacy": {"backend": "sql", "dsn": "x", "query": "", "querry": ""}})
    with pytest.raises(ConfigError, match=r"parity.meter: no meter named 'memory_gb_seconds'"):
        config_mod.parse({"legacy": {"backend": "http", "url": "http://x"}})


# HTTP -------------------------------------------------------------------------------------------


@pytest.fixture
async def legacy_api() -> AsyncIterator[HTTPRecorder]:
    with HTTPRecorder() as server:
        yield server


async def _http(url: str, **kw: Any) -> HTTPLegacySource:
    source = HTTPLegacySource(HTTPLegacyConfig(url=url, **kw))
    await source.start()
    return source


async def test_http_reads_rows_exactly_in_every_documented_shape(legacy_api: HTTPRecorder) -> None:
    bodies: list[Any] = [
        b'[["a", 1.10], ["b", "2.5"], ["a", 0.000001]]',
        b'{"rows": [{"org_id": "a", "value": 1.100001}, {"org_id": "b", "value": 2.5}]}',
    ]
    source = await _http(legacy_api.url + "/usage", token="legacy-token")
    try:
        for body in bodies:
            legacy_api.route = lambda _r, body=body: (200, body)
            assert await source.usage(T0, T0 + H) == {
                "a": Decimal("1.100001"),
                "b": Decimal("2.5"),
            }
        request = legacy_api.requests[-1]
        assert request.path == f"/usage?from={T0}&to={T0 + H}"
        assert request.headers["authorization"] == "Bearer legacy-token"
    finally:
        await source.close()


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (500, b"{}", "answered 500"),
        (200, b"not json", "invalid JSON"),
        (200, b'{"usage": []}', "object with `rows`"),
        (200, b'[["a"]]', r"row 0: expected \[org_id, value\]"),
        (200, b'[["a", true]]', "expected a number"),
    ],
)
async def test_http_refuses_what_it_cannot_read_exactly(
    legacy_api: HTTPRecorder, status: int, body: bytes, reason: str
) -> None:
    legacy_api.route = lambda _r: (status, body)
    source = await _http(legacy_api.url + "/usage")
    try:
        with pytest.raises(LegacyError, match=reason):
            await source.usage(T0, T0 + H)
    finally:
        await source.close()


async def test_http_unreachable_is_a_legacy_error() -> None:
    from tests.conftest import free_port

    source = await _http(f"http://127.0.0.1:{free_port()}/usage", timeout_seconds=2.0)
    try:
        with pytest.raises(LegacyError, match="unreachable"):
            await source.usage(T0, T0 + H)
    finally:
        await source.close()


async def test_http_optional_capabilities(legacy_api: HTTPRecorder) -> None:
    def route(request: Request) -> tuple[int, Any]:
        if request.path == "/billed-until":
            return 200, {"billed_until": T0}
        if request.path == "/orgs/a%2Fb/plan":
            return 200, {"plan": "pro"}
        return 404, {"error": "unknown org"}

    legacy_api.route = route
    bare = await _http(legacy_api.url + "/usage")
    full = await _http(
        legacy_api.url + "/usage",
        billed_until_url=legacy_api.url + "/billed-until",
        plan_url=legacy_api.url + "/orgs/{org}/plan",
    )
    try:
        assert bare.capabilities() == frozenset()
        with pytest.raises(CapabilityUnavailable, match=r"set legacy.billed_until_url"):
            await bare.billed_until()
        with pytest.raises(CapabilityUnavailable, match=r"set legacy.plan_url"):
            await bare.plan("a")
        assert full.capabilities() == {LegacyCapability.BILLED_UNTIL, LegacyCapability.PLAN}
        assert await full.billed_until() == T0
        assert await full.plan("a/b") == "pro"
        assert await full.plan("nobody") is None
    finally:
        await bare.close()
        await full.close()


def test_http_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"legacy.url: expected an http"):
        HTTPLegacySource(HTTPLegacyConfig(url="ftp://x"))
    with pytest.raises(ConfigError, match=r"legacy.plan_url: must contain"):
        HTTPLegacySource(HTTPLegacyConfig(url="http://x", plan_url="http://x/plan"))
