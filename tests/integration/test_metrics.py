"""`GET /metrics`: what it counts, what it reads at scrape time, and that `promtool` accepts it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.flags import FlagChange
from controlplane.http.app import create_app
from controlplane.interfaces import JobRun, Outcome, ParityRun
from controlplane.plugins.billing.fake import FakeBilling
from tests.conftest import HOUR, READ_TOKEN, T0, TOKEN, tick

AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def promtool() -> str:
    """`promtool` (Debian package prometheus; `./run test` installs it). Required in CI."""
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is missing: apt-get install prometheus (./run test installs it)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
async def plane(
    make_config: Callable[..., Config], clock: list[float], fake_billing: FakeBilling
) -> AsyncIterator[ControlPlane]:
    config = make_config(parity={"meter": "gbs"})
    yield ControlPlane(config, billing=fake_billing, clock=lambda: clock[0])


async def client_for(plane: ControlPlane) -> AsyncTestClient[Any]:
    return AsyncTestClient(app=create_app(plane.config, cp=plane))


async def test_exposition_counts_reads_and_passes_promtool(
    plane: ControlPlane, clock: list[float], fake_billing: FakeBilling, tmp_path: Path
) -> None:
    async with await client_for(plane) as client:
        batch = [tick("a", "acme", T0), tick("b", "acme", T0 + 60), tick("c", "beta", T0)]
        assert (await client.post("/v1/events", json=batch, headers=AUTH)).status_code == 200
        await client.post("/v1/events", json=[tick("a", "acme", T0)], headers=AUTH)  # duplicate
        bad = [tick("d", "acme", T0), {"id": "e", "type": "tick"}]
        assert (await client.post("/v1/events", json=bad, headers=AUTH)).status_code == 422

        before = (await client.get("/metrics")).text
        # the T0 bucket closed long ago (clock: T0 + 10 h, grace 600 s) and waits for rollup
        assert value(before, "controlplane_rollup_backlog_buckets") == 2
        assert value(before, "controlplane_rollup_lag_seconds") == 10 * HOUR - 600 - HOUR
        assert value(before, "controlplane_storage_up") == 1

        for org, customer in (("acme", "cus_a"), ("beta", "cus_b")):
            await plane.set_org(org, customer=customer, plan="pro", actor="t", effective_from=0)
        await plane.rollup()
        await plane.set_flags(
            [
                FlagChange("authority", "controlplane"),
                FlagChange("bill_from", T0),
                FlagChange("shadow", False),
            ],
            actor="t",
            reason="cutover",
        )
        fake_billing.fail_next(Outcome.REJECTED)
        await plane.send()
        fake_billing.throttled = 3  # as the Stripe plugin counts its 429 answers
        await plane.storage.record_job_run(
            JobRun(job="rollup", started_at=clock[0] - 2, ended_at=clock[0] - 1, outcome="ok")
        )
        await plane.storage.record_job_run(
            JobRun(job="send", started_at=clock[0], ended_at=clock[0], outcome="error", error="x")
        )
        await plane.storage.record_parity_run(
            ParityRun(
                meter="gbs",
                bucket_start=T0,
                bucket_end=T0 + HOUR,
                checked_at=int(clock[0]),
                orgs=2,
                mismatches=1,
                material=1,
                controlplane_micros=150_000_000,
                legacy_micros=100_000_000,
                worst_org="acme",
                worst_drift_micros=50_000_000,
                worst_relative="0.5",
                clean=False,
                alarming=True,
                alarm_since=T0,
            ),
            [],
            None,
        )

        r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text

    assert value(text, "controlplane_events_ingested_total", source="http") == 3
    assert value(text, "controlplane_events_duplicate_total", source="http") == 1
    assert value(text, "controlplane_events_rejected_total", source="http") == 2
    assert value(text, "controlplane_sends_total", outcome="accepted") == 1
    assert value(text, "controlplane_sends_total", outcome="rejected") == 1
    assert value(text, "controlplane_send_duration_seconds_count", outcome="accepted") == 1
    assert value(text, "controlplane_provider_throttled_total") == 3
    assert value(text, "controlplane_ledger_rows", state="sent", reason="") == 1
    assert value(text, "controlplane_ledger_rows", state="held", reason="provider_rejected") == 1
    assert value(text, "controlplane_rollup_backlog_buckets") == 0
    assert value(text, "controlplane_rollup_lag_seconds") == 0
    assert value(text, "controlplane_flag_shadow") == 0
    assert value(text, "controlplane_flag_authority", authority="controlplane") == 1
    assert value(text, "controlplane_flag_authority", authority="legacy") == 0
    assert value(text, "controlplane_flag_bill_from_seconds") == T0
    assert value(text, "controlplane_parity_drift_units", meter="gbs") == 50
    assert value(text, "controlplane_parity_relative_drift", meter="gbs") == 0.5
    assert value(text, "controlplane_parity_mismatching_orgs", meter="gbs") == 1
    assert value(text, "controlplane_parity_alarming", meter="gbs") == 1
    assert value(text, "controlplane_parity_last_bucket_seconds", meter="gbs") == T0
    assert value(text, "controlplane_job_last_success_seconds", job="rollup") == clock[0] - 1
    assert value(text, "controlplane_job_last_success_seconds", job="send") is None
    assert value(text, "controlplane_job_failures_in_a_row", job="send") == 1
    assert value(text, "controlplane_job_interval_seconds", job="rollup") == 60

    check = await asyncio.to_thread(
        subprocess.run,
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "" and check.stderr.strip() == "", "promtool lint findings"


async def test_rate_limit_and_too_large_refusals_are_counted(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    config = make_config(
        server={"max_body_bytes": 5000},
        rate_limit={"events_per_second": 0.001, "burst_events": 1},
    )
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as client:
        big = [tick(str(i), "acme", T0, pad="x" * 100) for i in range(100)]
        assert (await client.post("/v1/events", json=big, headers=AUTH)).status_code == 413
        assert (
            await client.post("/v1/events", json=tick("a", "acme", T0), headers=AUTH)
        ).is_success
        r = await client.post("/v1/events", json=tick("b", "acme", T0), headers=AUTH)
        assert r.status_code == 429
        text = (await client.get("/metrics")).text
    assert value(text, "controlplane_ingest_refused_total", reason="too_large") == 1
    assert value(text, "controlplane_ingest_refused_total", reason="rate_limited") == 1
    assert value(text, "controlplane_events_ingested_total", source="http") == 1


async def test_each_control_plane_has_its_own_registry(plane: ControlPlane) -> None:
    other = ControlPlane(plane.config)
    async with await client_for(plane) as client:
        await client.post("/v1/events", json=tick("a", "acme", T0), headers=AUTH)
        mine = (await client.get("/metrics")).text
    assert value(mine, "controlplane_events_ingested_total", source="http") == 1
    assert other.metrics.registry is not plane.metrics.registry
    assert other.metrics.events_ingested.labels("http")._value.get() == 0


async def test_a_storage_failure_is_reported_not_raised(plane: ControlPlane) -> None:
    async with await client_for(plane) as client:
        await client.post("/v1/events", json=tick("a", "acme", T0), headers=AUTH)
        await plane.storage.close()
        r = await client.get("/metrics")
        await plane.storage.start()  # for the lifespan's own close
    assert r.status_code == 200
    assert value(r.text, "controlplane_storage_up") == 0
    assert value(r.text, "controlplane_events_ingested_total", source="http") == 1


async def test_metrics_are_open_unless_a_token_is_required(
    make_config: Callable[..., Config],
) -> None:
    open_app = create_app(make_config())
    async with AsyncTestClient(app=open_app) as client:
        assert (await client.get("/metrics")).status_code == 200
    closed = make_config(server={"metrics_require_token": True})
    async with AsyncTestClient(app=create_app(closed)) as client:
        r = await client.get("/metrics")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/metrics", headers=READ)).status_code == 200
