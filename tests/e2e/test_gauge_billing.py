"""Billing storage by the GB-month for real (docs/gauge-meters-howto.md): `controlplane
catalog publish` and `serve` as processes, the Stripe emulator, the official SDK, over HTTP.

A repository's snapshot, put and visibility change become hourly GB-month rows; after the
cutover each reaches Stripe once; a late snapshot becomes corrections, and Stripe's totals
stay equal to the ledger's whole units, which stay the floor of the exact usage.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

from controlplane.units import to_micros
from tests.conftest import HOUR, TOKEN
from tests.e2e.processes import ROOT, Emulator, Server, base_config, bearer

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_e2e"
NOW_HOUR = int(time.time()) // HOUR * HOUR
START = NOW_HOUR - 24 * HOUR
GB = 10**9
METER = "storage_gb_months"
PER_PRIVATE_HOUR = 5_555_556  # 4,000 GB for an hour: 4000/720 GB-months, in micro-units


def config_text(db: Path, emulator: Emulator) -> str:
    return (
        base_config(db)
        + f"""
[rollup]
grace_seconds = 0
interval_seconds = 0.3

[sender]
interval_seconds = 0.3

[billing]
backend = "stripe"
api_key = "{API_KEY}"
api_base = "{emulator.url}"
rate_limit = 200.0
max_retries = 2
timeout_seconds = 5.0
backoff_base_seconds = 0.05
backoff_cap_seconds = 0.5

[[meters]]
name = "{METER}"
event_type = "repo.snapshot"
aggregation = "time_weighted"
mode = "level"
value = "data.bytes / 1000000000"
series = "data.repo"
where = "data.visibility == 'private'"
event_modes = {{ "repo.put" = "delta", "repo.visibility" = "state", "repo.deleted" = "state" }}
end = "data.deleted == 1"
time_unit_seconds = 2592000
unit = "GB-month"

[[catalog.products]]
key = "storage"
name = "Private storage"

[[catalog.prices]]
key = "storage_gb_month"
product = "storage"
lookup_key = "storage_gb_month"
meter = "{METER}"
unit_amount = "0.25"
currency = "usd"
interval = "month"
"""
    )


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "emulator.log", "--seed", "3")
    emu.start()
    yield emu
    emu.stop()


def cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", *args, "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def rows(api: httpx.Client) -> list[dict[str, Any]]:
    r = api.get("/v1/ledger", params={"limit": 10_000, "org": "acme"})
    r.raise_for_status()
    return [row for row in r.json()["rows"] if row["meter"] == METER]


def per_bucket(ledger: list[dict[str, Any]]) -> dict[int, int]:
    out: defaultdict[int, int] = defaultdict(int)
    for r in ledger:
        out[r["bucket_start"]] += to_micros(Decimal(r["value"]))
    return {b: v for b, v in out.items() if v}


def event(ident: str, kind: str, at: int, **data: Any) -> dict[str, Any]:
    return {
        "id": ident,
        "type": f"repo.{kind}",
        "subject": "acme",
        "ts": at * 1000,
        "data": {"repo": "acme/data", **data},
    }


def test_storage_is_billed_by_the_gb_month_at_the_emulator(
    tmp_path: Path, emulator: Emulator
) -> None:
    config = tmp_path / "cp.toml"
    config.write_text(config_text(tmp_path / "cp.db", emulator))
    cli(config, "migrate")
    assert "published catalog version 1" in cli(config, "catalog", "publish")
    sdk = stripe.StripeClient(API_KEY, base_addresses={"api": emulator.url}, max_network_retries=0)
    (meter,) = [m for m in sdk.v1.billing.meters.list().data if m.event_name == METER]
    assert meter.default_aggregation.formula == "sum"
    customer = sdk.v1.customers.create(params={"name": "acme"}).id

    server = Server(config, tmp_path / "server.log")
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers=bearer(TOKEN), timeout=10) as api:
            r = api.put(
                "/v1/orgs/acme", json={"customer": customer, "plan": "pro", "effective_from": 0}
            )
            assert r.status_code == 200, r.text
            batch = [
                event("snap-1", "snapshot", START, bytes=3000 * GB, visibility="public"),
                event("put-1", "put", START + 12 * HOUR, bytes=1000 * GB),
                event("vis-1", "visibility", START + 14 * HOUR, visibility="private"),
            ]
            assert api.post("/v1/events", json=batch).status_code == 200
            # every closed private hour, by hand: 4,000 GB x 1 h / 720 h
            private = range(START + 14 * HOUR, NOW_HOUR, HOUR)
            wait_for(
                lambda: all(per_bucket(rows(api)).get(b) == PER_PRIVATE_HOUR for b in private),
                30,
                "the private hours rolled up",
            )
            got = per_bucket(rows(api))
            assert set(got) >= set(private)
            assert all(b >= START + 14 * HOUR for b in got)  # public hours bill nothing
            assert all(v == PER_PRIVATE_HOUR for v in got.values())
            usage = api.get("/v1/usage", params={"org": "acme", "meter": METER}).json()
            assert {u["value"] for u in usage["rows"]} == {"5.555556"}, usage
            assert emulator.state()["meter_events_accepted"] == 0  # shadow: nothing sent

            for name, value in (
                ("authority", "controlplane"),
                ("bill_from", START),
                ("shadow", False),
            ):
                r = api.put(f"/v1/flags/{name}", json={"value": value, "reason": "e2e"})
                assert r.status_code == 200, r.text
            wait_for(lambda: not [r for r in rows(api) if r["state"] == "pending"], 30, "sent")

            # a late snapshot 16 hours in says 3,500 GB: every hour from it is corrected
            late = event("snap-late", "snapshot", START + 16 * HOUR, bytes=3500 * GB)
            assert api.post("/v1/events", json=[late]).status_code == 200
            lower = 4_861_111  # 3,500 GB for an hour: 3500/720 GB-months
            wait_for(
                lambda: per_bucket(rows(api)).get(START + 20 * HOUR) == lower,
                30,
                "the correction",
            )
            wait_for(lambda: not [r for r in rows(api) if r["state"] == "pending"], 30, "sent")
            ledger = rows(api)
    finally:
        server.stop()

    assert {r["state"] for r in ledger} == {"sent"}
    assert any(r["revision"] == 2 and Decimal(r["value"]) < 0 for r in ledger)
    sent = sum(r["quantity"] for r in ledger)
    exact = sum(to_micros(Decimal(r["value"])) for r in ledger)
    assert sent == exact // 1_000_000
    page = sdk.v1.billing.meters.event_summaries.list(
        meter.id, params={"customer": customer, "start_time": START, "end_time": NOW_HOUR + HOUR}
    )
    assert sum(int(s.aggregated_value) for s in page.data) == sent
    state = emulator.state()
    assert state["identifiers_accepted_more_than_once"] == 0
