"""The rollup asks the legacy biller for the plan of an org with none stored (DESIGN §8:
stored plan, then the legacy biller's answer, then `free`), and never bills an org as free
because the legacy biller could not answer."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.interfaces import LegacyCapability, LegacyError, LegacySource
from controlplane.ledger import Reason, RowState
from tests.conftest import HOUR, T0, tick


class PlanLegacy(LegacySource):
    """A legacy biller that knows some orgs' plans, and can be made to fail."""

    name = "plans"

    def __init__(self, plans: dict[str, str]) -> None:
        self.plans = plans
        self.asked: list[str] = []
        self.down = False

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def usage(self, start: int, end: int) -> dict[str, Decimal]:
        return {}

    def capabilities(self) -> frozenset[LegacyCapability]:
        return frozenset({LegacyCapability.PLAN})

    async def plan(self, org_id: str) -> str | None:
        self.asked.append(org_id)
        if self.down:
            raise LegacyError("legacy database unreachable")
        return self.plans.get(org_id)


def states(rows: list[object]) -> dict[str, tuple[RowState, str | None]]:
    return {r.org_id: (r.state, r.reason) for r in rows}  # type: ignore[attr-defined]


async def test_an_org_without_a_stored_plan_takes_the_legacy_plan(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    legacy = PlanLegacy({"known": "pro"})
    config = make_config(parity={"meter": "gbs"})
    async with ControlPlane(config, legacy=legacy, clock=lambda: clock[0]) as cp:
        await cp.set_org("stored", customer="cus_s", plan="free", actor="t", effective_from=0)
        events = [tick(f"e-{org}", org, T0 + 5) for org in ("known", "unknown", "stored")]
        await cp.ingest(events, "http")
        stats = await cp.rollup()
        assert stats.rows == 3 and stats.deferred_orgs == 0
        assert states(await cp.storage.ledger()) == {
            "known": (RowState.PENDING, None),  # pro, by the legacy biller
            "unknown": (RowState.EXCLUDED, Reason.FREE_PLAN),  # the legacy biller: no such org
            "stored": (RowState.EXCLUDED, Reason.FREE_PLAN),  # stored here: not asked
        }
        assert sorted(legacy.asked) == ["known", "unknown"]

        # Answers are reused for [rollup] legacy_plan_seconds.
        await cp.ingest([tick("late", "known", T0 + HOUR + 5)], "http")
        clock[0] += HOUR
        await cp.rollup()
        assert sorted(legacy.asked) == ["known", "unknown"]


async def test_when_the_legacy_biller_cannot_answer_the_org_waits(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    legacy = PlanLegacy({"known": "pro"})
    legacy.down = True
    config = make_config(parity={"meter": "gbs"})
    async with ControlPlane(config, legacy=legacy, clock=lambda: clock[0]) as cp:
        await cp.set_org("stored", customer="cus_s", plan="pro", actor="t", effective_from=0)
        await cp.ingest([tick("a", "known", T0 + 5), tick("b", "stored", T0 + 5)], "http")
        stats = await cp.rollup()
        assert stats.deferred_orgs == 1
        assert states(await cp.storage.ledger()) == {"stored": (RowState.PENDING, None)}
        assert (await cp.storage.dirty_backlog(T0 + 2 * HOUR, HOUR)).buckets == 1

        legacy.down = False
        stats = await cp.rollup()
        assert stats.deferred_orgs == 0
        assert states(await cp.storage.ledger())["known"] == (RowState.PENDING, None)


async def test_an_older_answer_stands_while_the_legacy_biller_is_down(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    legacy = PlanLegacy({"known": "pro"})
    config = make_config(parity={"meter": "gbs"}, rollup={"legacy_plan_seconds": 0})
    async with ControlPlane(config, legacy=legacy, clock=lambda: clock[0]) as cp:
        await cp.ingest([tick("a", "known", T0 + 5)], "http")
        await cp.rollup()
        legacy.down = True  # asked again (the answer is 0 s old at most), and fails
        await cp.ingest([tick("b", "known", T0 + HOUR + 5)], "http")
        clock[0] += HOUR
        stats = await cp.rollup()
        assert (stats.deferred_orgs, stats.pending) == (0, 1)
        assert legacy.asked == ["known", "known"]


async def test_an_org_whose_events_arrive_during_the_pass_waits_to_be_asked(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    legacy = PlanLegacy({"known": "pro", "newcomer": "pro"})
    config = make_config(parity={"meter": "gbs"})
    async with ControlPlane(config, legacy=legacy, clock=lambda: clock[0]) as cp:
        await cp.ingest([tick("a", "known", T0 + 5)], "http")
        ask = legacy.plan

        async def plan_while_a_backfill_lands(org_id: str) -> str | None:
            # a late event of an org nobody asked about yet, committed mid-pass
            await cp.ingest([tick("late", "newcomer", T0 + 7)], "http")
            return await ask(org_id)

        legacy.plan = plan_while_a_backfill_lands  # type: ignore[method-assign]
        await cp.rollup()
        assert states(await cp.storage.ledger()) == {"known": (RowState.PENDING, None)}
        legacy.plan = ask  # type: ignore[method-assign]
        await cp.rollup()  # now asked about, and billed by its plan there: never free by guess
        assert states(await cp.storage.ledger())["newcomer"] == (RowState.PENDING, None)
