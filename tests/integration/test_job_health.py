"""Job health: /readyz turns unready on a stale job, and the watcher alerts (with suppression)
on a failing or stale job through the alert webhook."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane import health
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from controlplane.interfaces import JobRun
from tests.harness import HTTPRecorder

ROLLUP_EVERY = 60.0
SEND_EVERY = 30.0


@pytest.fixture
def webhook() -> Iterator[HTTPRecorder]:
    with HTTPRecorder() as receiver:
        yield receiver


@pytest.fixture
def config(make_config: Callable[..., Config], webhook: HTTPRecorder) -> Config:
    return make_config(
        rollup={"bucket_seconds": 3600, "grace_seconds": 600, "interval_seconds": ROLLUP_EVERY},
        sender={"interval_seconds": SEND_EVERY},
        jobs={"stale_after_intervals": 3, "alert_after_failures": 2, "suppress_seconds": 3600},
        parity={"alert": {"webhook_url": webhook.url}},
    )


@pytest.fixture
async def plane(config: Config, clock: list[float]) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(config, clock=lambda: clock[0]) as cp:
        yield cp


async def run(cp: ControlPlane, job: str, at: float, outcome: str = "ok") -> None:
    error = "StorageError: disk full" if outcome == "error" else None
    await cp.storage.record_job_run(
        JobRun(job=job, started_at=at - 1, ended_at=at, outcome=outcome, error=error)
    )


async def test_readyz_names_the_stale_job_and_since_when(
    config: Config, clock: list[float]
) -> None:
    plane = ControlPlane(config, clock=lambda: clock[0])
    started = clock[0]
    app = create_app(config, cp=plane, scheduler=True)
    async with AsyncTestClient(app=app) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["jobs"]["rollup"]["status"] == "ok"

        clock[0] = started + 2.5 * ROLLUP_EVERY  # send (every 30 s) is past 3 intervals
        await run(plane, "send", clock[0] - 60)  # ...but it succeeded 60 s ago
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text

        clock[0] = started + 3 * ROLLUP_EVERY + 1
        r = await client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "not ready"
        jobs = body["checks"]["jobs"]
        assert jobs["rollup"]["status"] == "stale"
        assert jobs["rollup"]["last_success"] is None
        assert jobs["rollup"]["stale_since"] == started + 3 * ROLLUP_EVERY
        assert jobs["send"]["status"] == "stale"  # 91 s after its success
        assert jobs["send"]["stale_since"] == started + 2.5 * ROLLUP_EVERY - 60 + 3 * SEND_EVERY

        await run(plane, "rollup", clock[0])
        await run(plane, "send", clock[0])
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["jobs"]["rollup"]["last_success"] == clock[0]


async def test_readyz_does_not_judge_jobs_where_they_do_not_run(
    config: Config, clock: list[float]
) -> None:
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as client:
        clock[0] += 100 * ROLLUP_EVERY
        r = await client.get("/readyz")
    assert r.status_code == 200
    assert "jobs" not in r.json()["checks"]


async def test_a_restart_gets_a_full_allowance(plane: ControlPlane, clock: list[float]) -> None:
    await run(plane, "rollup", clock[0] - 86400)  # last success a day ago, before a restart
    now = clock[0]
    (rollup, _send) = await health.statuses(plane, now=now, watching_since=now - 10)
    assert not rollup.stale
    (rollup, _send) = await health.statuses(plane, now=now + 200, watching_since=now - 10)
    assert rollup.stale and rollup.stale_since == now - 10 + 3 * ROLLUP_EVERY
    (rollup, _send) = await health.statuses(plane, now=now, watching_since=None)
    assert rollup.stale  # judged from its last success alone
    off = msgspec.structs.replace(plane.config.jobs, stale_after_intervals=0)
    plane.config = msgspec.structs.replace(plane.config, jobs=off)
    (rollup, _send) = await health.statuses(plane, now=now + 1e6, watching_since=now)
    assert not rollup.stale and rollup.stale_after_seconds is None


async def test_a_failing_job_alerts_once_per_window_through_the_webhook(
    plane: ControlPlane, clock: list[float], webhook: HTTPRecorder
) -> None:
    now = clock[0]
    await run(plane, "rollup", now - 50)
    await run(plane, "send", now - 1)
    await run(plane, "rollup", now - 40, "error")
    stats = await health.watch(plane, watching_since=now - 100)
    assert (stats.unhealthy, stats.alerts) == (0, 0)  # one failure: below alert_after_failures

    await run(plane, "rollup", now - 30, "error")
    with capture_logs() as logs:
        stats = await health.watch(plane, watching_since=now - 100)
    assert (stats.unhealthy, stats.alerts, stats.delivered) == (1, 1, 1)
    (alert_log,) = [e for e in logs if e["event"] == "jobs.alert"]
    assert alert_log["job"] == "rollup" and alert_log["dedup_key"] == f"job:rollup:{int(now - 50)}"
    assert [e["event"] for e in logs if e["event"].startswith("jobs.")] == [
        "jobs.alert",
        "jobs.alert_sent",
    ]
    (request,) = webhook.requests
    posted = json.loads(request.body)
    assert posted["dedup_key"] == f"job:rollup:{int(now - 50)}"
    assert "`rollup` failed its last 2 passes" in posted["text"]
    assert "StorageError: disk full" in posted["text"]
    assert webhook.url.split("//")[1] not in str(logs)  # the URL is a secret: never logged

    clock[0] = now + 1800  # still failing, inside the suppression window
    await run(plane, "rollup", clock[0] - 1, "error")
    await run(plane, "send", clock[0] - 1)
    stats = await health.watch(plane, watching_since=now - 100)
    assert (stats.unhealthy, stats.alerts, stats.suppressed) == (1, 0, 1)
    assert len(webhook.requests) == 1

    clock[0] = now + 3601  # the window has passed: alerts again, same episode, same key
    await run(plane, "rollup", clock[0] - 1, "error")
    await run(plane, "send", clock[0] - 1)
    stats = await health.watch(plane, watching_since=now - 100)
    assert (stats.alerts, stats.delivered) == (1, 1)
    assert json.loads(webhook.requests[-1].body)["dedup_key"] == f"job:rollup:{int(now - 50)}"
    assert [a.state for a in await plane.storage.parity_alerts("job:rollup")] == ["sent", "sent"]
    assert await plane.storage.parity_alerts(plane.config.parity.meter) == []  # kept apart


async def test_a_stale_job_alerts_and_failed_delivery_is_retried(
    plane: ControlPlane, clock: list[float], webhook: HTTPRecorder
) -> None:
    now = clock[0]
    await run(plane, "rollup", now)
    webhook.route = lambda _r: (503, {"error": "busy"})
    stats = await health.watch(plane, watching_since=now - 3 * SEND_EVERY - 5)
    assert (stats.unhealthy, stats.alerts, stats.delivered) == (1, 1, 0)
    (alert,) = await plane.storage.parity_alerts("job:send")
    assert alert.state == "pending"
    assert "`send` has not succeeded since this process started" in alert.text
    webhook.route = lambda _r: (200, {"ok": True})
    clock[0] = now + 60
    await run(plane, "rollup", clock[0])
    stats = await health.watch(plane, watching_since=now - 3 * SEND_EVERY - 5)
    assert (stats.alerts, stats.suppressed, stats.delivered) == (0, 1, 1)
    (alert,) = await plane.storage.parity_alerts("job:send")
    assert (alert.state, alert.attempts) == ("sent", 2)


async def test_without_a_webhook_alerts_are_logged_only(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    config = make_config(jobs={"alert_after_failures": 1})
    async with ControlPlane(config, clock=lambda: clock[0]) as plane:
        await run(plane, "rollup", clock[0], "error")
        await run(plane, "send", clock[0])
        with capture_logs() as logs:
            stats = await health.watch(plane, watching_since=clock[0])
        assert stats.alerts == 1
        assert any(e["event"] == "jobs.alert" for e in logs)
        (alert,) = await plane.storage.parity_alerts("job:rollup")
        assert alert.state == "logged"
