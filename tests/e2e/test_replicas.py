"""Three `controlplane serve` replicas on one PostgreSQL, fed over HTTP and Redis Streams, one of
them SIGKILLed mid-run, sending to the Stripe emulator through the official SDK.

What must hold at the end: every event stored once (usage totals exact to the micro-unit),
every ledger row delivered once (the provider's totals equal the ledger's, no identifier
accepted twice, no two calls at once for one customer and meter), nothing rounded away.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.units import to_micros
from tests.conftest import HOUR, TOKEN
from tests.e2e.processes import Emulator, Server, bearer
from tests.e2e.test_stripe_sending import START, config_text, ledger, setup_stripe, summaries
from tests.e2e.test_stripe_sending import wait_for as wait_until
from tests.harness import fresh_database

pytestmark = pytest.mark.e2e

ORGS = [f"org{i}" for i in range(6)]
STREAM = "usage"


def replica_config(dsn: str, emulator: Emulator, redis_url: str) -> str:
    flags = f'shadow = false\nauthority = "controlplane"\nbill_from = {START}'
    text = config_text(dsn, emulator, flags=flags, concurrency=4, claim_seconds=5)
    return (
        text
        + f"""
[[ingest]]
backend = "redis_streams"
url = "{redis_url}"
stream = "{STREAM}"
group = "controlplane"
batch_size = 50
block_ms = 200
claim_idle_seconds = 2.0
claim_interval_seconds = 0.5
retry_base_seconds = 0.1
retry_cap_seconds = 1.0
"""
    )


def event(rng: random.Random, n: int, org: str) -> dict[str, Any]:
    bucket = START + rng.randrange(0, 6) * HOUR
    return {
        "id": f"ev-{n}",
        "type": "tick",
        "subject": org,
        "ts": (bucket + rng.randrange(0, HOUR)) * 1000,
        "data": {"mb": 4 * rng.randrange(1, 1024), "s": 20},  # x 20/1024: exact in micro-units
    }


def gb_seconds(e: dict[str, Any]) -> Fraction:
    return Fraction(e["data"]["mb"] * e["data"]["s"], 1024)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "emulator.log", "--seed", "11")
    emu.start()
    yield emu
    emu.stop()


def test_three_replicas_one_killed_every_event_once_every_row_once(
    tmp_path: Path, emulator: Emulator, postgres_dsn: str, redis_url: str
) -> None:
    import redis

    meter_id, customers = setup_stripe(emulator, ORGS)
    config = tmp_path / "replica.toml"
    config.write_text(replica_config(fresh_database(postgres_dsn), emulator, redis_url))
    replicas = [Server(config, tmp_path / f"replica{i}.log") for i in range(3)]
    replicas[0].start(timeout=40)  # the first one migrates; the others find the schema current
    for r in replicas[1:]:
        r.start(timeout=40)
    stream = redis.Redis.from_url(redis_url)
    rng = random.Random(20261122)
    sent_events: dict[str, dict[str, Any]] = {}
    try:
        with httpx.Client(headers=bearer(TOKEN), timeout=20) as http:
            for org in ORGS:
                r = http.put(
                    f"{replicas[0].url}/v1/orgs/{org}",
                    json={"customer": customers[org], "plan": "pro", "effective_from": 0},
                )
                assert r.status_code == 200, r.text
            n = 0
            for round_ in range(6):
                alive = [r for r in replicas if r.proc and r.proc.poll() is None]
                for replica in alive:
                    batch = [event(rng, n + i, rng.choice(ORGS)) for i in range(40)]
                    n += len(batch)
                    r = http.post(f"{replica.url}/v1/events", json=batch)
                    assert r.status_code == 200, r.text
                    sent_events.update((e["id"], e) for e in batch)
                    # the same batch again through another replica: duplicates, never stored twice
                    other = rng.choice(alive)
                    assert (
                        http.post(f"{other.url}/v1/events", json=batch[:10]).json()["accepted"] == 0
                    )
                for _ in range(60):
                    e = event(rng, n, rng.choice(ORGS))
                    n += 1
                    stream.xadd(STREAM, {"event": json.dumps(e)})
                    sent_events[e["id"]] = e
                if round_ == 2:
                    replicas[2].kill()  # mid-run: rollup, sends and stream reads in flight
                time.sleep(0.4)

            api = httpx.Client(base_url=replicas[0].url, headers=bearer(TOKEN), timeout=20)
            expected = {
                org: sum(
                    (gb_seconds(e) for e in sent_events.values() if e["subject"] == org),
                    Fraction(0),
                )
                for org in ORGS
            }

            def stored() -> dict[str, Fraction]:
                rows = api.get("/v1/usage", params={"meter": "gbs"}).json()["rows"]
                out = dict.fromkeys(ORGS, Fraction(0))
                for row in rows:
                    out[row["org_id"]] += Fraction(Decimal(row["value"]))
                return out

            deadline = time.monotonic() + 60
            while stored() != expected and time.monotonic() < deadline:
                time.sleep(0.2)
            assert stored() == expected, f"stream: {stream.xinfo_groups(STREAM)}"

            def settled() -> list[dict[str, Any]] | None:
                rows = ledger(api)
                if any(r["state"] == "pending" for r in rows):
                    return None
                sent = {o: sum(r["quantity"] for r in rows if r["org_id"] == o) for o in ORGS}
                return rows if all(sent[o] == int(expected[o]) for o in ORGS) else None

            rows = wait_until(settled, 90, "every row sent")
            # the dead consumer's entries were claimed, stored and acknowledged
            wait_until(lambda: stream.xpending(STREAM, "controlplane")["pending"] == 0, 20, "acks")
            api.close()
    finally:
        for r in replicas:
            r.stop()

    assert {r["state"] for r in rows} == {"sent"}
    assert any(r["revision"] > 1 for r in rows), "events arriving during rollups: corrections"
    assert len(sent_events) == n
    state = emulator.state()
    assert state["accepted_again_within_memory"] == 0
    assert state["identifiers_accepted_more_than_once"] == 0
    assert state["lock_timeouts"] == 0  # never two calls at once for one customer and meter
    assert state["meter_events_accepted"] == sum(1 for r in rows if r["quantity"] != 0)
    for org in ORGS:
        quantity = sum(r["quantity"] for r in rows if r["org_id"] == org)
        assert summaries(emulator, meter_id, customers[org], START, START + 6 * HOUR) == quantity
        micros = sum(to_micros(Decimal(r["value"])) for r in rows if r["org_id"] == org)
        assert Fraction(micros, 1_000_000) == expected[org]  # the ledger holds all usage
        assert quantity == int(expected[org])  # and bills all of it, nothing rounded away
