"""The legacy `invoices` capability: the SQL plugin's `invoices_query` (on SQLite) and the HTTP
plugin's `invoices_url`; a plugin without it says so."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import ConfigError
from controlplane.interfaces import (
    CapabilityUnavailable,
    LegacyCapability,
    LegacyError,
    LegacyInvoice,
    LegacyInvoiceLine,
)
from controlplane.plugins.legacy.http import HTTPLegacyConfig, HTTPLegacySource
from controlplane.plugins.legacy.sql import SQLLegacyConfig, SQLLegacySource
from tests.harness import HTTPRecorder, Request

START, END = 1_767_225_600, 1_769_904_000  # January 2026
USAGE = "SELECT 'a', 1 WHERE :start < :end"


@pytest.fixture
def legacy_db(tmp_path: Path) -> Path:
    db = tmp_path / "legacy.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            f"""
            CREATE TABLE invoice_lines (org_id TEXT, period_start INTEGER, item TEXT,
                                        cents INTEGER, price REAL);
            INSERT INTO invoice_lines VALUES
              ('a', {START}, 'Pro plan', 2000, 20.0),
              ('a', {START}, 'Memory GB-s', 2120, 0.5),
              ('b', {START}, 'Pro plan', 2000, 20.0),
              ('a', {END}, 'Pro plan', 2000, 20.0);
            """
        )
    return db


async def _sql(db: Path, **kw: Any) -> SQLLegacySource:
    source = SQLLegacySource(SQLLegacyConfig(dsn=f"sqlite:///{db}", query=USAGE, **kw))
    await source.start()
    return source


async def test_sql_invoices_with_lines_add_up_per_org(legacy_db: Path) -> None:
    source = await _sql(
        legacy_db,
        invoices_query="SELECT org_id, item, cents FROM invoice_lines "
        "WHERE period_start >= :start AND period_start < :end ORDER BY rowid",
    )
    try:
        assert LegacyCapability.INVOICES in source.capabilities()
        assert await source.invoices(START, END) == {
            "a": LegacyInvoice(
                "a",
                4120,
                [LegacyInvoiceLine("Pro plan", 2000), LegacyInvoiceLine("Memory GB-s", 2120)],
            ),
            "b": LegacyInvoice("b", 2000, [LegacyInvoiceLine("Pro plan", 2000)]),
        }
    finally:
        await source.close()


async def test_sql_invoice_totals_only(legacy_db: Path) -> None:
    source = await _sql(
        legacy_db,
        invoices_query="SELECT org_id, sum(cents) FROM invoice_lines "
        "WHERE period_start >= :start AND period_start < :end GROUP BY org_id",
    )
    try:
        assert await source.invoices(START, END) == {
            "a": LegacyInvoice("a", 4120),
            "b": LegacyInvoice("b", 2000),
        }
    finally:
        await source.close()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("SELECT org_id, price FROM invoice_lines WHERE :start < :end", "binary float"),
        ("SELECT org_id, '12.5' FROM invoice_lines WHERE :start < :end", "whole minor units"),
        ("SELECT org_id, cents FROM invoice_lines WHERE :start < :end", "a second total"),
        ("SELECT org_id FROM invoice_lines WHERE :start < :end", "expected \\(org id, total\\)"),
    ],
)
async def test_sql_invoices_refuses_what_is_not_whole_minor_units(
    legacy_db: Path, query: str, reason: str
) -> None:
    source = await _sql(legacy_db, invoices_query=query)
    try:
        with pytest.raises(LegacyError, match=reason):
            await source.invoices(START, END)
    finally:
        await source.close()


async def test_without_invoices_configured_the_plugins_say_so(legacy_db: Path) -> None:
    source = await _sql(legacy_db)
    http = HTTPLegacySource(HTTPLegacyConfig(url="http://127.0.0.1:9/usage"))
    try:
        assert LegacyCapability.INVOICES not in source.capabilities()
        with pytest.raises(CapabilityUnavailable, match=r"set legacy\.invoices_query"):
            await source.invoices(START, END)
        assert LegacyCapability.INVOICES not in http.capabilities()
        with pytest.raises(CapabilityUnavailable, match=r"set legacy\.invoices_url"):
            await http.invoices(START, END)
    finally:
        await source.close()
    with pytest.raises(ConfigError, match=r"legacy\.invoices_query: must use :start and :end"):
        SQLLegacySource(
            SQLLegacyConfig(dsn="sqlite:///x.db", query=USAGE, invoices_query="SELECT 1")
        )
    with pytest.raises(ConfigError, match=r"legacy\.invoices_url: expected an http"):
        HTTPLegacySource(HTTPLegacyConfig(url="http://x/u", invoices_url="file:///x"))


@pytest.fixture
async def legacy_api() -> AsyncIterator[HTTPRecorder]:
    with HTTPRecorder() as server:
        yield server


async def test_http_invoices_in_both_shapes(legacy_api: HTTPRecorder) -> None:
    bodies = [
        b'[{"org_id": "a", "total": 4120, "lines": [{"description": "Pro", "amount": 2000},'
        b' {"description": "Memory", "amount": 2120}]}, {"org_id": "b", "total": 2000}]',
        b'{"invoices": [{"org_id": "a", "total": "4120", "lines": [{"description": "Pro",'
        b' "amount": 2000}, {"description": "Memory", "amount": 2120.0}]},'
        b' {"org_id": "b", "total": 2000, "lines": null}]}',
    ]
    source = HTTPLegacySource(
        HTTPLegacyConfig(url=legacy_api.url + "/usage", invoices_url=legacy_api.url + "/invoices")
    )
    await source.start()
    try:
        assert LegacyCapability.INVOICES in source.capabilities()
        for body in bodies:

            def route(_r: Request, body: bytes = body) -> tuple[int, bytes]:
                return 200, body

            legacy_api.route = route
            assert await source.invoices(START, END) == {
                "a": LegacyInvoice(
                    "a", 4120, [LegacyInvoiceLine("Pro", 2000), LegacyInvoiceLine("Memory", 2120)]
                ),
                "b": LegacyInvoice("b", 2000),
            }
        assert legacy_api.requests[-1].path == f"/invoices?from={START}&to={END}"
        legacy_api.route = lambda _r: (200, b'[{"org_id": "a", "total": 1.5}]')
        with pytest.raises(LegacyError, match=r"invoice 0 \(a\), total: expected whole minor"):
            await source.invoices(START, END)
        legacy_api.route = lambda _r: (200, b'{"rows": []}')
        with pytest.raises(LegacyError, match="object with `invoices`"):
            await source.invoices(START, END)
    finally:
        await source.close()
