"""Sending for real: `controlplane serve`, the Stripe emulator and the official SDK, over HTTP.

Covers the path a team takes: usage ingested and rolled up in shadow (nothing reaches Stripe),
then the flags flipped and every ledger row delivered exactly once, also through crashes of the
control plane at random moments and an emulator injecting faults and dropped connections.
"""

from __future__ import annotations

import random
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
from tests.e2e.processes import Emulator, Server, base_config, bearer

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_e2e"
NOW_HOUR = int(time.time()) // HOUR * HOUR
START = NOW_HOUR - 30 * HOUR  # buckets well inside Stripe's 35-day window


def config_text(
    db: Path | str,
    emulator: Emulator,
    *,
    flags: str = "",
    rate_limit: float = 200.0,
    concurrency: int = 8,
    claim_seconds: int = 2,
) -> str:
    """A killed server's claims on ledger rows lapse after `claim_seconds`, short here so a
    restarted server takes its rows over at once."""
    return (
        base_config(db)
        + f"""
[rollup]
grace_seconds = 0
interval_seconds = 0.3

[sender]
interval_seconds = 0.3
concurrency = {concurrency}
claim_seconds = {claim_seconds}

[flags]
{flags}

[billing]
backend = "stripe"
api_key = "{API_KEY}"
api_base = "{emulator.url}"
rate_limit = {rate_limit}
max_retries = 2
timeout_seconds = 5.0
backoff_base_seconds = 0.05
backoff_cap_seconds = 0.5
"""
    )


def sdk(emulator: Emulator) -> stripe.StripeClient:
    return stripe.StripeClient(API_KEY, base_addresses={"api": emulator.url}, max_network_retries=0)


def setup_stripe(emulator: Emulator, orgs: list[str]) -> tuple[str, dict[str, str]]:
    client = sdk(emulator)
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "Memory",
            "event_name": "memory_gb_seconds",
            "default_aggregation": {"formula": "sum"},
        }
    )
    customers = {org: client.v1.customers.create(params={"name": org}).id for org in orgs}
    return meter.id, customers


def ticks(org: str, bucket: int, n: int, prefix: str = "") -> list[dict[str, Any]]:
    """`n` ticks worth 512*20/1024 = 10 GB-seconds each, plus an odd 1.95... to force carries."""
    out = [
        {
            "id": f"{prefix}{org}-{bucket}-{i}",
            "type": "tick",
            "subject": org,
            "ts": (bucket + i * 20) * 1000,
            "data": {"mb": 512, "s": 20},
        }
        for i in range(n)
    ]
    out.append(
        {
            "id": f"{prefix}{org}-{bucket}-odd",
            "type": "tick",
            "subject": org,
            "ts": (bucket + 7) * 1000,
            "data": {"mb": 100, "s": 20},
        }
    )
    return out


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ledger(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    r = api.get("/v1/ledger", params={"limit": 10_000, **params})
    r.raise_for_status()
    return r.json()["rows"]  # type: ignore[no-any-return]


def summaries(emulator: Emulator, meter_id: str, customer: str, start: int, end: int) -> int:
    page = sdk(emulator).v1.billing.meters.event_summaries.list(
        meter_id, params={"customer": customer, "start_time": start, "end_time": end}
    )
    return sum(int(s.aggregated_value) for s in page.data)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "emulator.log", "--seed", "7")
    emu.start()
    yield emu
    emu.stop()


def test_shadow_sends_nothing_then_cutover_delivers_exact_totals(
    tmp_path: Path, emulator: Emulator
) -> None:
    orgs = ["acme", "globex", "initech"]
    meter_id, customers = setup_stripe(emulator, orgs)
    config = tmp_path / "cp.toml"
    config.write_text(config_text(tmp_path / "cp.db", emulator))
    server = Server(config, tmp_path / "server.log")
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers=bearer(TOKEN), timeout=10) as api:
            events = [
                e
                for org in [*orgs, "hooli"]
                for h in range(4)
                for e in ticks(org, START + h * HOUR, 30)
            ]
            for i in range(0, len(events), 200):
                assert api.post("/v1/events", json=events[i : i + 200]).status_code == 200
            for org in orgs:
                api.put(
                    f"/v1/orgs/{org}",
                    json={"customer": customers[org], "plan": "pro", "effective_from": 0},
                )
            api.put("/v1/orgs/hooli", json={"plan": "pro", "effective_from": 0})  # no customer yet

            rows = wait_for(
                lambda: len(ledger(api)) == 16 and ledger(api), 20, "rollup of 16 buckets"
            )
            assert {r["state"] for r in rows} == {"pending"}
            wait_for(
                lambda: any(
                    r["outcome"] == "skipped"
                    for r in api.get("/v1/jobs", params={"job": "send"}).json()["runs"]
                ),
                10,
                "a send pass",
            )
            assert emulator.state()["meter_events_accepted"] == 0  # shadow: nothing reaches Stripe

            bill_from = START + HOUR
            for name, value in (
                ("authority", "controlplane"),
                ("bill_from", bill_from),
                ("shadow", False),
            ):
                r = api.put(f"/v1/flags/{name}", json={"value": value, "reason": "e2e cutover"})
                assert r.status_code == 200, r.text
            wait_for(lambda: not ledger(api, state="pending"), 30, "every row decided")

            rows = ledger(api)
            by_state: dict[tuple[str, str | None], int] = defaultdict(int)
            for r in rows:
                by_state[(r["state"], r["reason"])] += 1
            assert by_state == {
                ("excluded", "before_bill_from"): 4,
                ("sent", None): 9,
                ("held", "no_customer"): 3,
            }
            for org in orgs:
                sent = sum(
                    r["quantity"] for r in rows if r["org_id"] == org and r["state"] == "sent"
                )
                assert sent > 0
                assert summaries(emulator, meter_id, customers[org], START, NOW_HOUR) == sent
            state = emulator.state()
            assert state["meter_events_accepted"] == 9
            assert state["identifiers_accepted_more_than_once"] == 0
    finally:
        server.stop()


def test_crashes_faults_and_dropped_connections_never_double_count(
    tmp_path: Path, emulator: Emulator
) -> None:
    orgs = [f"org{i}" for i in range(8)]
    meter_id, customers = setup_stripe(emulator, orgs)
    emulator.faults(fail_rate=0.1, drop_rate=0.15, latency_ms=5)
    config = tmp_path / "cp.toml"
    flags = f'shadow = false\nauthority = "controlplane"\nbill_from = {START}'
    config.write_text(config_text(tmp_path / "cp.db", emulator, flags=flags, rate_limit=60))
    rng = random.Random(20261122)
    log = tmp_path / "server.log"
    with httpx.Client(headers=bearer(TOKEN), timeout=10) as http:
        for iteration in range(20):
            server = Server(config, log)
            server.start()
            if iteration == 0:
                for org in orgs:
                    http.put(
                        f"{server.url}/v1/orgs/{org}",
                        json={"customer": customers[org], "plan": "pro", "effective_from": 0},
                    )
            # fresh usage each round, and late events for buckets that may already be sent
            bucket = START + rng.randrange(0, 28) * HOUR
            events = [e for org in orgs for e in ticks(org, bucket, 5, prefix=f"r{iteration}-")]
            assert http.post(f"{server.url}/v1/events", json=events).status_code == 200
            time.sleep(rng.uniform(0.2, 1.5))
            server.kill()
            server.stop()

        emulator.faults(fail_rate=0.0, drop_rate=0.0, latency_ms=0)
        server = Server(config, log)
        server.start()
        try:
            http.base_url = httpx.URL(server.url)
            wait_for(
                lambda: not ledger(http, state="pending") and ledger(http), 60, "everything sent"
            )
            rows = ledger(http)
            usage = http.get("/v1/usage", params={"meter": "gbs"}).json()["rows"]
        finally:
            server.stop()

    assert {r["state"] for r in rows} == {"sent"}
    assert any(r["revision"] > 1 for r in rows), "late events should have produced corrections"
    state = emulator.state()
    assert state["identifiers_accepted_more_than_once"] == 0
    assert state["accepted_again_within_memory"] == 0
    assert state["dropped_connections"] > 0 and state["injected_failures"] > 0  # faults happened
    assert state["meter_events_accepted"] == sum(1 for r in rows if r["quantity"] != 0)
    for org in orgs:
        sent = sum(r["quantity"] for r in rows if r["org_id"] == org)
        assert summaries(emulator, meter_id, customers[org], START, NOW_HOUR) == sent
        total = sum(to_micros(Decimal(u["value"])) for u in usage if u["org_id"] == org)
        assert sent == total // 1_000_000  # nothing lost, nothing rounded away


def test_client_rate_limit_keeps_under_the_emulators_limit(tmp_path: Path) -> None:
    emulator = Emulator(tmp_path / "emulator.log", "--rate-limit", "25")
    emulator.start()
    try:
        orgs = [f"org{i}" for i in range(10)]
        _, customers = setup_stripe(emulator, orgs)
        time.sleep(1.1)  # let the setup calls leave the emulator's window
        flags = f'shadow = false\nauthority = "controlplane"\nbill_from = {START}'
        config = tmp_path / "cp.toml"
        config.write_text(config_text(tmp_path / "cp.db", emulator, flags=flags, rate_limit=25))
        server = Server(config, tmp_path / "server.log")
        server.start()
        try:
            with httpx.Client(base_url=server.url, headers=bearer(TOKEN), timeout=10) as api:
                for org in orgs:
                    api.put(
                        f"/v1/orgs/{org}",
                        json={"customer": customers[org], "plan": "pro", "effective_from": 0},
                    )
                events = [
                    e for org in orgs for h in range(8) for e in ticks(org, START + h * HOUR, 3)
                ]
                assert api.post("/v1/events", json=events).status_code == 200
                wait_for(lambda: len(ledger(api, state="sent")) == 80, 60, "80 rows sent")
        finally:
            server.stop()
        state = emulator.state()
        assert state["rate_limited"] == 0
        assert state["max_requests_per_second"] <= 25
        assert state["meter_events_accepted"] == 80
    finally:
        emulator.stop()
