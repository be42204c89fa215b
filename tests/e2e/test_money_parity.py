"""Money parity end to end: the Stripe emulator and `controlplane serve` as real processes, the
catalog published over the real SDK, usage ingested, planned and rolled up with the real CLI,
a legacy biller's invoices in its own SQLite database; then `GET /internal/money-parity` over
HTTP (token and signature) and `controlplane parity money` in a subprocess report each
deliberate difference with its exact drift, and both runs are stored."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controlplane import parity
from controlplane.money import month_bounds, month_of
from tests.conftest import TOKEN
from tests.e2e.processes import ROOT, Emulator, Server, base_config, bearer

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_e2e_money_parity"
SECRET = "e2e-money-secret"
# the previous calendar month: closed, inside Stripe's 35-day window for nothing (not sent)
PERIOD = month_of(month_bounds(month_of(int(time.time())))[0] - 1)
START, END = month_bounds(PERIOD)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "emulator.log")
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", *argv, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_money_parity_over_real_processes(emulator: Emulator, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.db"
    with sqlite3.connect(legacy) as conn:
        conn.execute("CREATE TABLE invoices (org_id TEXT, period_start INTEGER, cents INTEGER)")
        conn.executemany(
            "INSERT INTO invoices VALUES (?, ?, ?)",
            [("acme", START, 2040), ("globex", START, 2380), ("hooli", START, 2000)],
        )
    config = tmp_path / "cp.toml"
    config.write_text(
        base_config(tmp_path / "cp.db", scopes="ingest read admin parity")
        + f"""
[billing]
backend = "stripe"
api_key = "{API_KEY}"
api_base = "{emulator.url}"

[parity]
meter = "gbs"
hmac_secret = "{SECRET}"

[legacy]
backend = "sql"
dsn = "sqlite:///{legacy}"
query = "SELECT org_id, 0 FROM invoices WHERE :start < :end"
invoices_query = '''SELECT org_id, cents FROM invoices
                    WHERE period_start >= :start AND period_start < :end'''

[[catalog.products]]
key = "pro"
name = "Pro"

[[catalog.prices]]
key = "memory"
product = "pro"
lookup_key = "memory_v1"
unit_amount = "0.0004"
meter = "gbs"

[[catalog.prices]]
key = "base"
product = "pro"
lookup_key = "base_v1"
unit_amount = "20.00"
"""
    )
    events = tmp_path / "events.ndjson"
    with events.open("w") as f:
        for org, ticks in (("acme", 50), ("globex", 500), ("initech", 5)):
            for i in range(ticks):  # 20 GB-s each
                at = START + 86400 + 20 * i
                f.write(
                    json.dumps(
                        {"id": f"{org}-{i}", "type": "tick", "subject": org, "ts": at * 1000,
                         "data": {"mb": 1024, "s": 20}}
                    ) + "\n"
                )  # fmt: skip
    for argv in (
        ("catalog", "publish"),
        ("ingest", str(events)),
        *(("orgs", "set", org, "--plan", "pro", "--effective-from", str(START))
          for org in ("acme", "globex", "initech")),
        ("rollup",),
    ):  # fmt: skip
        done = cli(config, *argv)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)

    server = Server(config, tmp_path / "serve.log")
    server.start()
    try:
        query = f"period={PERIOD}"
        r = httpx.get(f"{server.url}/internal/money-parity?{query}", headers=bearer(TOKEN))
        timestamp = str(int(time.time()))
        signed = httpx.get(
            f"{server.url}/internal/money-parity?{query}",
            headers={
                "X-Timestamp": timestamp,
                "X-Signature": parity.sign(SECRET, timestamp, "/internal/money-parity", query),
            },
        )
        runs = httpx.get(f"{server.url}/v1/parity/money-runs", headers=bearer(TOKEN))
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    assert signed.status_code == 200 and signed.json()["orgs"] == r.json()["orgs"]
    body = r.json()
    assert body["catalog_version"] == 1
    got = {
        o["org_id"]: (o["controlplane_minor"], o["legacy_minor"], o["drift_minor"])
        for o in body["orgs"]
    }
    assert got == {
        "acme": (2040, 2040, 0),  # 1000 GB-s x 0.04 cents + $20
        "globex": (2400, 2380, 20),  # the legacy biller's lower unit price
        "initech": (2004, None, 2004),  # only the control plane bills it
        "hooli": (None, 2000, -2000),  # only the legacy biller does
    }
    assert body["summary"]["status"] == "mismatch" and body["summary"]["mismatches"] == 3
    assert [x["id"] for x in runs.json()["runs"]] == [2, 1]

    done = cli(config, "parity", "money", "--period", PERIOD, "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert {o["org_id"]: o["drift_minor"] for o in report["orgs"]} == {
        org: v[2] for org, v in got.items()
    }
    assert report["run_id"] == 3
