"""On PostgreSQL, a plan set while a rollup step holds the org's bucket for an unknown plan:
the step read the plans before the change committed and writes its hold after. Releasing gives
the org's dirty buckets new marks (as ingest does), so the step's hold (and its clear) no
longer match them, and the bucket is rolled up with the new plan instead of staying held with
nothing to wake it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.ledger import RowState
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.plugins.storage import postgres as pgmod
from tests.conftest import HOUR, T0, tick
from tests.harness import fresh_database


async def test_a_plan_set_during_a_rollup_step_is_not_lost_to_its_hold(
    make_config: Callable[..., Config],
    clock: list[float],
    fake_billing: FakeBilling,
    postgres_dsn: str,
) -> None:
    storage = {"backend": "postgres", "dsn": fresh_database(postgres_dsn)}
    three = [
        {"name": "free", "billable": False},
        {"name": "pro", "billable": True},
        {"name": "gold", "billable": True},
    ]
    config = make_config(plans=three, storage=storage)
    async with ControlPlane(config, billing=fake_billing, clock=lambda: clock[0]) as cp:
        await cp.set_org("o1", customer="cus_1", plan="gold", actor="t", effective_from=0)
        await cp.ingest([tick("a", "o1", T0 + 5)], "http")
    # `gold` is no longer configured: the rollup holds o1's bucket for an unknown plan
    async with ControlPlane(
        make_config(storage=storage), billing=fake_billing, clock=lambda: clock[0]
    ) as cp:
        original = pgmod.PostgresConnection.fetch
        fixed: list[bool] = []

        async def fetch(self: Any, query: str, *args: Any) -> Any:
            if query == "batch_token_plans" and not fixed:
                fixed.append(True)  # the operator fixes the plan in the middle of the step
                await cp.set_org(
                    "o1", customer=None, plan="pro", actor="op", effective_from=0, force=True
                )
            return await original(self, query, *args)

        pgmod.PostgresConnection.fetch = fetch  # type: ignore[method-assign]
        try:
            await cp.rollup(until=T0 + HOUR)
        finally:
            pgmod.PostgresConnection.fetch = original  # type: ignore[method-assign]
        assert fixed
        (row,) = await cp.storage.ledger(org_id="o1")
        assert (row.state, row.bucket_start, row.plan_source) == (RowState.PENDING, T0, "stored")
        assert (await cp.storage.dirty_backlog(T0 + HOUR, HOUR)).held == 0
