"""Money parity storage: billable ledger quantities per period, and stored runs."""

from __future__ import annotations

from controlplane.interfaces import MeterQuantity, MoneyOrgResult, MoneyRun, Storage
from tests.contract.helpers import HOUR, NOW, UNIT, B, event, pro, roll


def money_run(start: int, *, checked_at: int, clean: bool = True, **fields: object) -> MoneyRun:
    values: dict[str, object] = {
        "period_start": start,
        "period_end": start + 4 * HOUR,
        "checked_at": checked_at,
        "currency": "usd",
        "tolerance": "0.005",
        "orgs": 3,
        "mismatches": 0 if clean else 2,
        "only_controlplane": 0 if clean else 1,
        "only_legacy": 0,
        "stripe_findings": 0,
        "controlplane_minor": 9_000_000_000_000_001,
        "legacy_minor": 9_000_000_000_000_001 if clean else 4_000,
        "clean": clean,
    }
    values.update(fields)
    return MoneyRun(**values)  # type: ignore[arg-type]


async def test_ledger_quantities_sum_billable_rows_of_the_period(storage: Storage) -> None:
    await pro(storage, "a", "b")
    # `f` has no stored plan: its rows are excluded as free_plan and bill nothing.
    await storage.insert_events(
        [event(f"a{i}", "a", B[i], 1_500_000) for i in range(6)]
        + [event(f"a{i}c", "a", B[i], 7 * UNIT, "calls") for i in range(2)]
        + [event("b0", "b", B[0], 10**12 * UNIT), event("b5", "b", B[5], 3 * UNIT)]
        + [event(f"f{i}", "f", B[i], 9 * UNIT) for i in range(3)],
        HOUR,
    )
    await roll(storage)
    found = await storage.ledger_quantities(B[0], B[4])
    # a: 1.5 per bucket, floored along the chain: 1, 2, 1, 2 -> 6 units in B[0..3]
    assert found == [
        MeterQuantity("a", "calls", 14),
        MeterQuantity("a", "gbs", 6),
        MeterQuantity("b", "gbs", 10**12),
    ]
    later = await storage.ledger_quantities(B[4], B[8])
    assert later == [MeterQuantity("a", "gbs", 3), MeterQuantity("b", "gbs", 3)]
    assert await storage.ledger_quantities(B[8], B[9]) == []


async def test_money_runs_round_trip_newest_period_first(storage: Storage) -> None:
    orgs = [
        MoneyOrgResult("a", 4_120, 4_000, None, False),
        MoneyOrgResult("b", 9_000_000_000_000_001, 9_000_000_000_000_001, 12, True),
        MoneyOrgResult("c", 10, None, None, False),
        MoneyOrgResult("d", None, 500, None, False),
    ]
    first = await storage.record_money_run(money_run(B[0], checked_at=NOW, clean=False), orgs)
    again = await storage.record_money_run(money_run(B[0], checked_at=NOW + 60), [])
    newer = await storage.record_money_run(
        money_run(B[4], checked_at=NOW, legacy_minor=None), orgs[1:2]
    )
    assert len({first, again, newer}) == 3
    runs = await storage.money_runs()
    assert [r.id for r in runs] == [newer, again, first]
    assert runs[0].legacy_minor is None and runs[0].clean is True
    assert runs[2] == money_run(B[0], checked_at=NOW, clean=False, id=first)
    assert [r.id for r in await storage.money_runs(limit=1)] == [newer]
    found = await storage.money_run(first)
    assert found is not None
    assert found[0].id == first and found[1] == orgs
    assert await storage.money_run(newer + 1000) is None
