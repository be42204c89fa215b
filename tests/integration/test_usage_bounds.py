"""One ingest token cannot stop billing for everyone (issue: one client's values stopping the
rollup): values past the bound are a 422 naming the event, never a 503 that clients retry, and
a bucket stored past the bound before ingest refused it is held and alerted while the rollup
goes on for every other bucket."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from controlplane.ledger import RowState
from controlplane.rollup import HELD_ALERTS
from controlplane.scrape import exposition
from controlplane.units import MAX_MICROS
from tests.conftest import HOUR, T0, TOKEN, tick

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(
    make_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[tuple[AsyncTestClient[Any], ControlPlane]]:
    config = make_config()
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        yield c, plane


async def test_one_event_past_the_bound_is_refused_and_the_rollup_goes_on(
    client: tuple[AsyncTestClient[Any], ControlPlane],
) -> None:
    http, cp = client
    huge = [tick(f"h{i}", "mallory", T0 + i * HOUR + 5, mb=9223372036854, s=1024) for i in (0, 1)]
    r = await http.post("/v1/events", json=huge, headers=AUTH)
    assert r.status_code == 422, r.text
    assert "out of range" in r.text
    r = await http.post("/v1/events", json=[tick("ok", "acme", T0 + 5)], headers=AUTH)
    assert r.status_code == 200
    stats = await cp.rollup()
    assert (stats.buckets, stats.held) == (1, 0)
    assert [r.org_id for r in await cp.storage.ledger()] == ["acme"]


async def test_events_summing_past_the_bound_are_a_422_naming_the_event(
    client: tuple[AsyncTestClient[Any], ControlPlane],
) -> None:
    http, cp = client
    # each 6e11 units (inside the per-event bound), together past 1e12 in one bucket
    mb = 600_000_000_000 // 20 * 1024
    first = await http.post("/v1/events", json=tick("a", "acme", T0 + 5, mb=mb), headers=AUTH)
    assert first.status_code == 200
    r = await http.post("/v1/events", json=tick("b", "acme", T0 + 9, mb=mb), headers=AUTH)
    assert r.status_code == 422, r.text
    body = r.json()
    assert "'b'" in body["detail"] and "1000000000000" in body["detail"]
    assert [u.value_micros for u in await cp.storage.usage("acme", "gbs", None, None)] == [
        600_000_000_000 * 10**6
    ]


async def test_a_bucket_stored_past_the_bound_is_held_alerted_and_the_others_rolled_up(
    cp: ControlPlane, make_config: Callable[..., Config]
) -> None:
    await cp.ingest([tick("m", "mallory", T0 + 5), tick("a", "acme", T0 + 5)], "http")
    # as a store written before ingest refused such totals holds it
    with sqlite3.connect(make_config().storage.path) as db:  # type: ignore[union-attr]
        db.execute(
            "UPDATE bucket_totals SET micros = ? WHERE org_id = 'mallory'", (2 * MAX_MICROS,)
        )
    stats = await cp.rollup()
    assert (stats.buckets, stats.held) == (1, 1)
    (row,) = await cp.storage.ledger()
    assert (row.org_id, row.state, row.reason) == ("acme", RowState.EXCLUDED, "free_plan")
    (alert,) = await cp.storage.parity_alerts(HELD_ALERTS)
    assert "mallory" in alert.text and "past the" in alert.text
    backlog = await cp.storage.dirty_backlog(cp.now(), HOUR)
    assert (backlog.buckets, backlog.held) == (0, 1)
    assert (await cp.rollup()).held == 0  # passed by, not retried on every pass
    body = await exposition(cp, watching_since=None)
    assert "controlplane_rollup_held_buckets 1.0" in body.decode()
