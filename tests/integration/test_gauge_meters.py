"""Gauge meters everywhere else: the usage API, parity against a legacy biller reporting
GB-hours, plans (free-plan hours excluded), and the ledger and sender through a cutover."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.flags import FlagChange
from controlplane.http.app import create_app
from controlplane.ledger import Reason, RowState
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.units import MICROS
from tests.conftest import HOUR, T0, TOKEN
from tests.gauge_helpers import GB, METER, STORAGE_METER, ev
from tests.harness import HTTPRecorder, Request


class Legacy:
    """A legacy biller reporting private GB-hours per org over a window."""

    def __init__(self) -> None:
        self.usage: dict[int, dict[str, str]] = {}
        self.server = HTTPRecorder(self.route)

    def route(self, request: Request) -> tuple[int, Any]:
        query = dict(p.split("=") for p in request.path.split("?", 1)[1].split("&"))
        start, end = int(query["from"]), int(query["to"])
        rows = [
            [org, value]
            for bucket, orgs in self.usage.items()
            if start <= bucket < end
            for org, value in orgs.items()
        ]
        return 200, rows


@pytest.fixture
def legacy() -> Iterator[Legacy]:
    biller = Legacy()
    with biller.server:
        yield biller


@pytest.fixture
def config(make_config: Callable[..., Config], legacy: Legacy) -> Config:
    return make_config(
        meters=[STORAGE_METER],
        parity={"meter": METER},
        legacy={"backend": "http", "url": legacy.server.url + "/usage"},
    )


async def test_parity_compares_derived_gb_hours_with_the_legacy_biller(
    config: Config, legacy: Legacy, clock: list[float]
) -> None:
    async with ControlPlane(config, clock=lambda: clock[0]) as cp:
        await cp.ingest(
            [
                ev("a", "snapshot", T0, org="acme", bytes=2 * GB, visibility="private"),
                ev("b", "snapshot", T0 + 1800, org="beta", bytes=GB, visibility="private"),
            ],
            "test",
        )
        await cp.rollup(until=T0 + 2 * HOUR)
        legacy.usage[T0] = {"acme": "2", "beta": "0.5"}
        legacy.usage[T0 + HOUR] = {"acme": "2", "beta": "1.2"}  # 20 % over for beta
        first = await cp.parity(T0, T0 + HOUR)
        both = await cp.parity(T0, T0 + 2 * HOUR)
    assert [(o.org_id, o.controlplane, o.within_tolerance) for o in first.orgs] == [
        ("acme", 2 * MICROS, True),
        ("beta", MICROS // 2, True),
    ]
    drift = {o.org_id: o for o in both.orgs}
    assert drift["acme"].within_tolerance
    assert drift["beta"].controlplane == 3 * MICROS // 2
    assert not drift["beta"].within_tolerance


async def test_usage_api_plans_and_sending_treat_a_gauge_like_any_meter(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    config = make_config(meters=[STORAGE_METER])
    fake = FakeBilling()
    async with ControlPlane(config, billing=fake, clock=lambda: clock[0]) as cp:
        await cp.set_org("acme", customer="cus_acme", plan="free", actor="t", effective_from=0)
        await cp.set_org("acme", customer=None, plan="pro", actor="t", effective_from=T0 + HOUR)
        await cp.ingest(
            [ev("a", "snapshot", T0, org="acme", bytes=3 * GB, visibility="private")], "test"
        )
        await cp.rollup(until=T0 + 3 * HOUR)
        rows = await cp.ledger()
        assert [(r.bucket_start, r.state, r.reason) for r in rows] == [
            (T0, RowState.EXCLUDED, Reason.FREE_PLAN),
            (T0 + HOUR, RowState.PENDING, None),
            (T0 + 2 * HOUR, RowState.PENDING, None),
        ]
        await cp.set_flags(
            [
                FlagChange("authority", "controlplane"),
                FlagChange("bill_from", T0),
                FlagChange("shadow", False),
            ],
            actor="t",
            reason="test",
            force=True,
        )
        await cp.send()
        sent = await cp.ledger(state=RowState.SENT)
        app = create_app(config, cp=cp)
        async with AsyncTestClient(app=app) as client:
            r = await client.get(
                "/v1/usage",
                params={"org": "acme", "meter": METER},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
    assert [(r.bucket_start, r.quantity) for r in sent] == [(T0 + HOUR, 3), (T0 + 2 * HOUR, 3)]
    assert [(e.customer, e.event_name, e.value) for e in fake.events.values()] == [
        ("cus_acme", METER, 3),
        ("cus_acme", METER, 3),
    ]
    assert r.status_code == 200, r.text
    assert [Decimal(u["value"]) for u in r.json()["rows"]] == [Decimal(3)] * 3
