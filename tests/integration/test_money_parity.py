"""Money parity over HTTP and the CLI: the ledger priced with the catalog against seeded legacy
invoices (a SQLite legacy database) with deliberate differences, each reported with its exact
drift; runs stored; preflight behind `[cutover] require_money_parity`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane import cli, parity
from controlplane.cli.commands.parity import parity as parity_cmd
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from tests.conftest import HOUR, READ_TOKEN, T0, TOKEN, tick

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATH = "/internal/money-parity"
SECRET = "money-secret"
FEB = T0 + 31 * 86400  # January 2026 is [T0, FEB)

CATALOG = {
    "products": [{"key": "pro", "name": "Pro"}],
    "prices": [
        # 0.04 cents per GB-second, 0.1 cent per call, a $20.00 monthly fee
        {"key": "memory", "product": "pro", "lookup_key": "mem", "unit_amount": "0.0004",
         "meter": "gbs"},
        {"key": "calls", "product": "pro", "lookup_key": "calls", "unit_amount": "0.001",
         "meter": "calls"},
        {"key": "base", "product": "pro", "lookup_key": "base", "unit_amount": "20.00"},
    ],
}  # fmt: skip

# What the legacy biller invoiced for January, line by line, in cents.
LEGACY_LINES = [
    ("exact", "Pro plan", 2000),
    ("exact", "Memory 1000 GB-s", 40),
    # a unit-price difference: the legacy biller charges 0.038 cents per GB-second
    ("price", "Pro plan", 2000),
    ("price", "Memory 10000 GB-s", 380),
    # a minimum fee the catalog does not have: invoices are topped up to $25.00
    ("minimum", "Pro plan", 2000),
    ("minimum", "Memory 100 GB-s", 4),
    ("minimum", "Minimum fee top-up", 496),
    # a rounding difference: 15 calls x 0.1 cent = 1.5 cents, which the legacy biller truncates
    ("rounding", "Pro plan", 2000),
    ("rounding", "Calls 15", 1),
    # an org only the legacy biller invoiced
    ("legacy_only", "Pro plan", 2000),
]


def legacy_db(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE lines (org_id TEXT, period_start INTEGER, item TEXT, cents INT)")
        conn.executemany(
            "INSERT INTO lines VALUES (?, ?, ?, ?)",
            [(org, T0, item, cents) for org, item, cents in LEGACY_LINES],
        )
    return path


def money_config(make_config: Callable[..., Config], db: Path | None, **more: Any) -> Config:
    sections: dict[str, Any] = {
        "catalog": CATALOG,
        "parity": {"meter": "gbs", "hmac_secret": SECRET},
        **more,
    }
    if db is not None:
        sections["legacy"] = {
            "backend": "sql",
            "dsn": f"sqlite:///{db}",
            "query": "SELECT org_id, 0 FROM lines WHERE :start < :end",
            "invoices_query": "SELECT org_id, item, cents FROM lines "
            "WHERE period_start >= :start AND period_start < :end ORDER BY rowid",
        }
    return make_config(**sections)


async def seed(cp: ControlPlane) -> None:
    """January usage of pro orgs, rolled up into the ledger (shadow: every row pending)."""
    usage = {"exact": 50, "price": 500, "minimum": 5, "cp_only": 25}  # 20 GB-s per tick
    for org in (*usage, "rounding"):
        await cp.set_org(org, customer=None, plan="pro", actor="test", effective_from=T0)
    for org, ticks in usage.items():
        events = [tick(f"{org}-{i}", org, T0 + 10 * HOUR + 20 * i) for i in range(ticks)]
        await cp.ingest(events, "test")
    calls = [
        {"id": f"call-{i}", "type": "call", "subject": "rounding", "ts": (T0 + 5 * HOUR) * 1000}
        for i in range(15)
    ]
    await cp.ingest(calls, "test")
    # February usage is another period
    await cp.ingest([tick("exact-feb", "exact", FEB + HOUR)], "test")
    await cp.rollup()


@pytest.fixture
def clock() -> list[float]:
    return [float(FEB + 3 * 86400)]


async def test_each_deliberate_difference_is_reported_with_its_exact_drift(
    make_config: Callable[..., Config], clock: list[float], tmp_path: Path
) -> None:
    config = money_config(make_config, legacy_db(tmp_path / "legacy.db"))
    async with ControlPlane(config, clock=lambda: clock[0]) as cp:
        await seed(cp)
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as client:
        r = await client.get(PATH, params={"period": "2026-01", "lines": "true"}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        runs = await client.get("/v1/parity/money-runs", headers=AUTH)
        run = await client.get(f"/v1/parity/money-runs/{body['run_id']}", headers=AUTH)

    assert (body["from"], body["to"], body["currency"]) == (T0, FEB, "usd")
    orgs = {o["org_id"]: o for o in body["orgs"]}
    got = {
        org: (o["side"], o["controlplane_minor"], o["legacy_minor"], o["drift_minor"],
              o["drift_percent"], o["within_tolerance"])
        for org, o in orgs.items()
    }  # fmt: skip
    assert got == {
        "exact": ("both", 2040, 2040, 0, "0", True),
        "price": ("both", 2400, 2380, 20, "0.8404", False),  # 20 / 2380, rounded up
        "minimum": ("both", 2004, 2500, -496, "19.84", False),
        "rounding": ("both", 2002, 2001, 1, "0.05", False),
        "cp_only": ("controlplane", 2020, None, 2020, None, False),
        "legacy_only": ("legacy", None, 2000, -2000, "100", False),
    }
    assert body["summary"] == {
        "status": "mismatch",
        "orgs": 6,
        "mismatches": 5,
        "only_controlplane": 1,
        "only_legacy": 1,
        "stripe_findings": 0,
        "totals": {
            "controlplane_minor": 2040 + 2400 + 2004 + 2002 + 2020,
            "legacy_minor": 2040 + 2380 + 2500 + 2001 + 2000,
            "drift_minor": 10466 - 10921,
            "drift_percent": "4.1663",
        },
    }
    # the per-line breakdown shows where each difference comes from
    rounding = orgs["rounding"]["lines"]
    calls = next(x for x in rounding["controlplane"] if x["price"] == "calls")
    assert (calls["quantity"], calls["unit_amount_decimal"], calls["amount_minor"]) == (
        15,
        "0.1",
        2,
    )
    assert rounding["legacy"] == [
        {"description": "Pro plan", "amount_minor": 2000},
        {"description": "Calls 15", "amount_minor": 1},
    ]
    memory = next(x for x in orgs["price"]["lines"]["controlplane"] if x["price"] == "memory")
    assert (memory["quantity"], memory["unit_amount_decimal"], memory["amount_minor"]) == (
        10000, "0.04", 400,
    )  # fmt: skip
    assert any("taxes" in n or "legacy" in n for n in body["notes"]) or body["notes"] == []

    # the run is stored, with every org's amounts
    assert runs.status_code == 200 and run.status_code == 200, (runs.text, run.text)
    assert [x["id"] for x in runs.json()["runs"]] == [body["run_id"]]
    stored = run.json()
    assert (stored["status"], stored["mismatches"], stored["legacy_minor"]) == (
        "mismatch", 5, 10921,
    )  # fmt: skip
    assert {o["org_id"]: (o["controlplane_minor"], o["legacy_minor"]) for o in
            stored["org_results"]} == {org: (v[1], v[2]) for org, v in got.items()}  # fmt: skip


async def test_bad_requests_name_the_field_and_store_nothing(
    make_config: Callable[..., Config], clock: list[float], tmp_path: Path
) -> None:
    config = money_config(make_config, legacy_db(tmp_path / "legacy.db"))
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as client:
        for params, status, field in (
            ({"period": "2026-13"}, 400, "period"),  # breaks the documented pattern
            ({"period": "0001-01"}, 422, "period"),
            ({"period": "2026-01", "from": T0}, 422, "period"),
            ({"from": T0 + 1, "to": FEB}, 422, "from"),
            ({"from": T0}, 422, "to"),
            ({"from": FEB, "to": T0}, 422, "to"),
        ):
            r = await client.get(PATH, params=params, headers=AUTH)
            assert r.status_code == status, (params, r.text)
            assert r.json()["errors"][0]["field"] == field
        unauthorized = await client.get(PATH, params={"period": "2026-01"})
        reader = await client.get(
            PATH, params={"period": "2026-01"}, headers={"Authorization": f"Bearer {READ_TOKEN}"}
        )
        runs = await client.get("/v1/parity/money-runs", headers=AUTH)
    assert (unauthorized.status_code, reader.status_code) == (401, 403)
    assert runs.json()["runs"] == []


async def test_signed_requests_are_accepted_as_for_usage_parity(
    make_config: Callable[..., Config], clock: list[float], tmp_path: Path
) -> None:
    config = money_config(make_config, legacy_db(tmp_path / "legacy.db"))
    plane = ControlPlane(config, clock=lambda: clock[0])
    query = "period=2026-01"
    timestamp = str(int(clock[0]))
    headers = {
        "X-Timestamp": timestamp,
        "X-Signature": parity.sign(SECRET, timestamp, PATH, query),
    }
    async with AsyncTestClient(app=create_app(config, cp=plane)) as client:
        ok = await client.get(f"{PATH}?{query}", headers=headers)
        forged = await client.get(f"{PATH}?{query}", headers={**headers, "X-Signature": "0" * 64})
    assert ok.status_code == 200, ok.text
    assert ok.json()["summary"]["only_legacy"] == 5  # no usage seeded: every legacy org
    assert forged.status_code == 401


async def _cli(config: Config, *argv: str) -> int:
    args = cli.build_parser().parse_args(["parity", "money", *argv])
    with capture_logs():  # log events stay out of the command's output
        return await parity_cmd(args, config)


async def test_cli_table_json_and_exit_codes(
    make_config: Callable[..., Config],
    clock: list[float],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = money_config(make_config, legacy_db(tmp_path / "legacy.db"))
    async with ControlPlane(config, clock=lambda: clock[0]) as cp:
        await seed(cp)
    assert await _cli(config, "--period", "2026-01") == 1
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha()}
    assert table["minimum"][1:6] == ["20.04", "25.00", "-4.96", "19.84", "NO"]
    assert table["rounding"][1:6] == ["20.02", "20.01", "0.01", "0.05", "NO"]
    assert table["legacy_only"][1:3] == ["-", "20.00"]
    assert "status: mismatch" in out and "taxes, discounts and proration" in out

    assert await _cli(config, "--period", "2026-01", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert {o["org_id"]: o["drift_minor"] for o in report["orgs"]}["price"] == 20

    no_legacy = money_config(make_config, None)
    assert await _cli(no_legacy, "--period", "2026-01", "--json") == 3
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["status"] == "no_legacy"
    assert report["orgs"][0]["drift_minor"] is None
    assert any("no legacy source" in n for n in report["notes"])


async def test_preflight_requires_the_last_closed_month_clean_when_configured(
    make_config: Callable[..., Config], clock: list[float], tmp_path: Path
) -> None:
    db = legacy_db(tmp_path / "legacy.db")
    required = money_config(make_config, db, cutover={"require_money_parity": True})
    async with ControlPlane(required, clock=lambda: clock[0]) as cp:
        await seed(cp)
        report = await cp.cutover.preflight(FEB + 86400)
        check = next(c for c in report.checks if c.name == "money_parity")
        assert check.status == "fail" and not report.ok
        assert check.detail.startswith("2026-01: 5 of 6 orgs outside the money tolerance")
        assert "worst cp_only: drift 2020" in check.detail
        assert len(await cp.money_parity.runs()) == 1  # the check is stored as a run
        # the legacy biller agrees once its invoices match the catalog's pricing
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM lines")
            conn.executemany(
                "INSERT INTO lines VALUES (?, ?, 'total', ?)",
                [(org, T0, cents) for org, cents in (
                    ("exact", 2040), ("price", 2400), ("minimum", 2004), ("rounding", 2002),
                    ("cp_only", 2020),
                )],
            )  # fmt: skip
        report = await cp.cutover.preflight(FEB + 86400)
        check = next(c for c in report.checks if c.name == "money_parity")
        assert check.status == "pass", check.detail
    optional = money_config(make_config, db)
    async with ControlPlane(optional, clock=lambda: clock[0]) as cp:
        report = await cp.cutover.preflight(FEB + 86400)
        check = next(c for c in report.checks if c.name == "money_parity")
        assert check.status == "n/a"
