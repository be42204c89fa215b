"""Parity against a real legacy database: PostgreSQL on loopback (tests/harness.py).

The legacy biller keeps sandbox runs (org, memory_mb, started_at, ended_at; ended_at null while
running) and bills memory by the second. Its query clips each run to the window at both ends.
The control plane is fed 20-second ticks for the same runs (aligned to the wall clock, so no
tick straddles a bucket boundary). Buckets are hourly, B0 = 2026-01-01T00:00Z:

- B0: both sides agree exactly (runs clipped at the window's start, at its end, at both ends,
  a run inside it, runs entirely before and after it, and a run still going);
- from B1 on, drift is injected: org `gone` is missing from the legacy biller, and the control
  plane under-counts org `under` by 3 % (its ticks report 97 % of the memory).

The checker, run once per settled bucket, finds B0 clean, B1 and B2 alarming (the missing org
is more than 10 % of the total), delivers exactly one alert to a webhook receiver after B2,
and suppresses the next one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane import config as config_mod
from controlplane import parity
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from tests.conftest import HOUR, T0, TOKEN, raw_config, tick
from tests.harness import HTTPRecorder

B0, B1, B2, B3, B4 = (T0 + i * HOUR for i in range(5))
TICK = 20
NOW = B4 + 1800  # the ticks run up to here: "now" while feeding them

LEGACY_QUERY = """
SELECT org_id,
       sum(memory_mb::numeric * extract(epoch FROM
             least(coalesce(ended_at, to_timestamp(:end)), to_timestamp(:end))
             - greatest(started_at, to_timestamp(:start)))) / 1024
FROM sandbox_runs
WHERE started_at < to_timestamp(:end)
  AND (ended_at IS NULL OR ended_at > to_timestamp(:start))
GROUP BY org_id
"""


class Run(msgspec.Struct, frozen=True):
    org: str
    mb: int  # what the legacy biller records
    start: int
    end: int | None  # None: still running
    cp_mb: int | None = None  # what the control plane's ticks report (default: mb)
    legacy: bool = True  # False: the legacy biller never saw this run


RUNS = [
    Run("steady", 1024, B0 - 1800, B0 + 1800),  # clipped at the window's start
    Run("steady", 1024, B0 + 2700, B1 + 900),  # clipped at its end
    Run("wide", 640, B0 - 600, B4 + 600),  # clipped at both ends
    Run("short", 2048, B0 + 600, B0 + 1210),  # inside the window
    Run("short", 2048, B0 - 7200, B0 - 3600),  # before it
    Run("short", 2048, B4 + 100, B4 + 700),  # after it
    Run("running", 512, B0 + 1234, None),  # still running: ended_at is null
    Run("under", 3200, B0, B1),  # agrees in B0
    Run("under", 3200, B1, B4, cp_mb=3104),  # the control plane sees 97 %
    Run("gone", 4096, B1, B4, legacy=False),  # the legacy biller lost this org
]

# B0 as the legacy biller must bill it: GB-seconds = MB * seconds in the window / 1024
EXPECTED_B0 = {
    "steady": Decimal(1800 + 900),
    "wide": Decimal(3600 * 640) / 1024,
    "short": Decimal(610 * 2),
    "running": Decimal((3600 - 1234) * 512) / 1024,
    "under": Decimal(3600 * 3200) / 1024,
}


def ticks(i: int, run: Run) -> Iterator[dict[str, Any]]:
    """20-second ticks for a run, each reporting the seconds it covers, up to NOW."""
    end = run.end if run.end is not None else NOW
    mb = run.cp_mb or run.mb
    t = run.start
    while t < end:
        upto = min((t // TICK + 1) * TICK, end)
        yield tick(f"run{i}-{t}", run.org, t, mb=mb, s=upto - t)
        t = upto


async def _legacy_table(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            DROP TABLE IF EXISTS sandbox_runs;
            CREATE TABLE sandbox_runs (
                id         serial PRIMARY KEY,
                org_id     text NOT NULL,
                memory_mb  integer NOT NULL,
                started_at timestamptz NOT NULL,
                ended_at   timestamptz
            );
            CREATE TABLE IF NOT EXISTS billing_state (billed_through timestamptz);
            """
        )
        await conn.executemany(
            "INSERT INTO sandbox_runs (org_id, memory_mb, started_at, ended_at)"
            " VALUES ($1, $2, to_timestamp($3), to_timestamp($4))",
            [(r.org, r.mb, r.start, r.end) for r in RUNS if r.legacy],
        )
    finally:
        await conn.close()


@pytest.fixture
def webhook() -> Iterator[HTTPRecorder]:
    with HTTPRecorder() as receiver:
        yield receiver


@pytest.fixture
async def config(postgres_dsn: str, tmp_path: Path, webhook: HTTPRecorder) -> Config:
    await _legacy_table(postgres_dsn)
    return config_mod.parse(
        raw_config(
            tmp_path / "cp.db",
            legacy={
                "backend": "sql",
                "dsn": postgres_dsn,
                "query": LEGACY_QUERY,
                "billed_until_query": "SELECT max(billed_through) FROM billing_state",
            },
            parity={
                "meter": "gbs",
                "settle_seconds": 1800,
                "backfill_buckets": 1,
                "hmac_secret": "pg-secret",
                "alert": {"webhook_url": webhook.url},
            },
        )
    )


async def feed(cp: ControlPlane) -> None:
    events = [e for i, run in enumerate(RUNS) for e in ticks(i, run)]
    for start in range(0, len(events), 5000):
        result = await cp.ingest(events[start : start + 5000], "sandbox")
        assert result.duplicates == 0


@pytest.fixture
async def plane(config: Config, clock: list[float]) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(config, clock=lambda: clock[0]) as cp:
        await feed(cp)
        yield cp


async def test_legacy_query_clips_runs_to_the_window(plane: ControlPlane) -> None:
    assert plane.legacy is not None
    assert await plane.legacy.usage(B0, B1) == EXPECTED_B0
    b1 = await plane.legacy.usage(B1, B2)
    assert b1["steady"] == 900 and b1["running"] == 1800 and "short" not in b1
    assert "gone" not in b1
    assert await plane.legacy.billed_until() is None  # nothing billed yet, and it says so


async def test_parity_holds_then_drift_is_caught_and_alerted_once(
    config: Config, webhook: HTTPRecorder, clock: list[float]
) -> None:
    async with ControlPlane(config, clock=lambda: clock[0]) as plane:
        await feed(plane)
        # the test client serves the app from its own event loop: give it its own plane
        app = create_app(config, cp=ControlPlane(config, clock=lambda: clock[0]))
        async with AsyncTestClient(app=app) as client:
            await _endpoint(client, clock)
        await _checker(plane, webhook, clock)


async def _endpoint(client: AsyncTestClient[Any], clock: list[float]) -> None:
    # signed: B0 agrees exactly, org by org
    query = f"from={B0}&to={B1}"
    timestamp = str(int(clock[0]))
    headers = {
        "X-Timestamp": timestamp,
        "X-Signature": parity.sign("pg-secret", timestamp, "/internal/usage-parity", query),
    }
    r = await client.get(f"/internal/usage-parity?{query}", headers=headers)
    assert r.status_code == 200, r.text
    b0 = r.json()
    assert b0["summary"]["status"] == "clean"
    assert {o["org_id"]: Decimal(o["legacy"]) for o in b0["orgs"]} == EXPECTED_B0
    assert all(o["drift"] == "0" and o["within_tolerance"] for o in b0["orgs"])
    assert b0["summary"]["totals"]["controlplane"] == b0["summary"]["totals"]["legacy"]

    r = await client.get(
        "/internal/usage-parity",
        params={"from": B1, "to": B2},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    b1 = r.json()
    orgs = {o["org_id"]: o for o in b1["orgs"]}
    assert b1["summary"]["status"] == "mismatch"
    assert {o for o, v in orgs.items() if not v["within_tolerance"]} == {"gone", "under"}
    assert orgs["gone"]["side"] == "controlplane" and orgs["gone"]["legacy"] is None
    assert orgs["gone"]["controlplane"] == "14400"  # 4096 MB for an hour
    assert orgs["under"]["legacy"] == "11250" and orgs["under"]["controlplane"] == "10912.5"
    assert orgs["under"]["relative_drift"] == "0.03"
    assert b1["summary"]["alarming"] is True  # the missing org is > 10 % of the total


async def _checker(plane: ControlPlane, webhook: HTTPRecorder, clock: list[float]) -> None:
    # the checker, once per settled bucket; the webhook hears exactly one alert
    clock[0] = B1 + 1800
    assert (await plane.parity_check()).clean == 1
    assert (await plane.parity_clean_since()).since == B0
    clock[0] = B2 + 1800
    stats = await plane.parity_check()
    assert (stats.checked, stats.mismatched, stats.alerts) == (1, 1, 0)
    assert webhook.requests == []
    clock[0] = B3 + 1800
    with capture_logs() as logs:
        stats = await plane.parity_check()
    assert (stats.checked, stats.alerts, stats.delivered) == (1, 1, 1)
    assert [e["dedup_key"] for e in logs if e["event"] == "parity.alert"] == [f"parity:gbs:{B1}"]
    clock[0] = B4 + 1800
    stats = await plane.parity_check()
    assert (stats.checked, stats.suppressed) == (1, 1)
    assert (await plane.parity_check()).checked == 0
    assert len(webhook.requests) == 1
    alert = webhook.requests[0].json()
    assert alert["dedup_key"] == f"parity:gbs:{B1}"
    assert "gone" in alert["text"] and "2 consecutive buckets" in alert["text"]

    runs = await plane.storage.parity_runs("gbs")
    assert [(r.bucket_start, r.clean, r.alarming) for r in runs] == [
        (B3, False, True),
        (B2, False, True),
        (B1, False, True),
        (B0, True, False),
    ]
    found = await plane.storage.parity_run(runs[1].id)
    assert found is not None
    assert [(d.org_id, d.legacy_micros) for d in found[1]] == [
        ("gone", None),
        ("under", 11_250_000_000),
    ]
    assert (await plane.parity_clean_since()).since is None
