"""Parity storage: usage per org from events, checked buckets, the clean tail and alerts."""

from __future__ import annotations

import msgspec
import pytest

from controlplane.interfaces import OrgDrift, ParityAlert, ParityRun, Storage
from tests.contract.helpers import HOUR, NOW, UNIT, B, event, pro, roll


def run(bucket: int, *, clean: bool = True, meter: str = "gbs", **fields: object) -> ParityRun:
    values: dict[str, object] = {
        "meter": meter,
        "bucket_start": bucket,
        "bucket_end": bucket + HOUR,
        "checked_at": bucket + HOUR + 900,
        "orgs": 3,
        "mismatches": 0 if clean else 2,
        "material": 0 if clean else 1,
        "controlplane_micros": 10**15 + 5,
        "legacy_micros": 10**15 + (5 if clean else 900_000_000),
        "worst_org": None if clean else "a",
        "worst_drift_micros": 0 if clean else 899_999_995,
        "worst_relative": None if clean else "0.125",
        "clean": clean,
        "alarming": not clean,
        "alarm_since": None if clean else bucket,
    }
    values.update(fields)
    return ParityRun(**values)  # type: ignore[arg-type]


def alert(bucket: int, *, meter: str = "gbs", state: str = "pending", at: int = NOW) -> ParityAlert:
    return ParityAlert(
        meter=meter,
        bucket_start=bucket,
        dedup_key=f"{meter}:{bucket}",
        text=f"drift on {meter} at {bucket}",
        state=state,
        created_at=at,
    )


# usage_by_org ---------------------------------------------------------------------------


async def test_usage_by_org_sums_events_over_wide_and_narrow_windows(storage: Storage) -> None:
    events = []
    for i in range(24):
        for n, org in enumerate(("a", "b", "c", "d")):
            if org == "d" and i < 20:
                continue  # `d` appears late in the history
            micros = (i + 1) * 1_000_003 + n * 10**13
            events.append(event(f"{org}{i}", org, B[i] + 17 * n, micros))
            events.append(event(f"{org}{i}x", org, B[i] + 1800, 1))
            if org != "c":  # `c` has no `calls`
                events.append(event(f"{org}{i}c", org, B[i], 5 * UNIT, "calls"))
    await storage.insert_events(events, HOUR)
    per_bucket: dict[tuple[str, str, int], int] = {}
    for e in events:
        for meter, micros in e.values:
            key = (e.org_id, meter, e.time_ms // 1000 // HOUR * HOUR)
            per_bucket[key] = per_bucket.get(key, 0) + micros

    def expect(meter: str, start: int, end: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for (org, m, bucket), micros in per_bucket.items():
            if m == meter and start <= bucket < end:
                out[org] = out.get(org, 0) + micros
        return out

    windows = [
        (B[0], B[24]),  # the whole history
        (B[0] - 30 * HOUR, B[24] + 30 * HOUR),  # wider than it
        (B[5], B[6]),  # one bucket: the checker's window
        (B[0], B[1]),
        (B[23], B[24]),
        (B[20], B[21]),  # `d`'s first bucket
        (B[19], B[20]),  # just before it
        (B[2], B[14]),  # half of it
        (B[3] + 1, B[5] + 1),  # buckets *starting* in the window: B[4] and B[5]
        (B[24], B[30]),  # after it
        (B[0] - 10 * HOUR, B[0]),  # before it
        (B[7], B[7]),  # empty
    ]
    for meter in ("gbs", "calls", "nothing"):
        for start, end in windows:
            got = await storage.usage_by_org(meter, start, end)
            assert got == expect(meter, start, end), (meter, start, end)
            assert all(type(v) is int for v in got.values())

    # Late events count at once.
    await storage.insert_events([event("late", "a", B[5] + 1, 7)], HOUR)
    assert (await storage.usage_by_org("gbs", B[5], B[6]))["a"] == expect("gbs", B[5], B[6])[
        "a"
    ] + 7


async def test_usage_by_org_reads_events_not_the_ledger(storage: Storage) -> None:
    await pro(storage, "a")
    await storage.insert_events([event("e1", "a", B[0], 1_500_000)], HOUR)
    await roll(storage)
    await storage.insert_events([event("e2", "a", B[0], 250_000)], HOUR)  # not rolled up yet
    assert await storage.usage_by_org("gbs", B[0], B[1]) == {"a": 1_750_000}


# runs -----------------------------------------------------------------------------------


async def test_a_bucket_is_recorded_once_with_its_mismatches_and_alert(storage: Storage) -> None:
    first = run(B[0], clean=False)
    drifts = [OrgDrift("a", 5 * UNIT, None), OrgDrift("b", None, 7), OrgDrift("c", 10**15, 1)]
    run_id = await storage.record_parity_run(first, drifts, alert(B[0]))
    assert isinstance(run_id, int)

    again = run(B[0], clean=True, checked_at=NOW)
    assert await storage.record_parity_run(again, [], alert(B[0], state="sent")) is None
    stored = await storage.parity_run(run_id)
    assert stored is not None
    stored_run, stored_drifts = stored
    assert stored_run == msgspec.structs.replace(first, id=run_id)
    assert sorted(stored_drifts, key=lambda d: d.org_id) == drifts
    (only,) = await storage.parity_alerts("gbs")
    assert (only.bucket_start, only.state) == (B[0], "pending")
    assert await storage.parity_runs("gbs") == [stored_run]

    # Another meter's check of the same bucket is its own run.
    other_id = await storage.record_parity_run(run(B[0], meter="calls"), [], None)
    assert other_id is not None and other_id != run_id
    other = await storage.parity_run(other_id)
    assert other == (msgspec.structs.replace(run(B[0], meter="calls"), id=other_id), [])
    assert await storage.parity_run(run_id + other_id + 1000) is None


async def test_parity_runs_are_newest_bucket_first_and_filtered(storage: Storage) -> None:
    for i in (3, 0, 5, 1, 4, 2):  # recorded out of order
        assert await storage.record_parity_run(run(B[i], clean=i != 2), [], None) is not None
    await storage.record_parity_run(run(B[9], meter="calls"), [], None)

    runs = await storage.parity_runs("gbs")
    assert [r.bucket_start for r in runs] == [B[5], B[4], B[3], B[2], B[1], B[0]]
    assert [r.clean for r in runs] == [True, True, True, False, True, True]
    assert all(r.id for r in runs) and len({r.id for r in runs}) == 6
    assert [r.bucket_start for r in await storage.parity_runs("gbs", limit=2)] == [B[5], B[4]]
    window = await storage.parity_runs("gbs", start=B[1], end=B[3])
    assert [r.bucket_start for r in window] == [B[2], B[1]]
    assert [r.bucket_start for r in await storage.parity_runs("gbs", start=B[4])] == [B[5], B[4]]
    assert [r.bucket_start for r in await storage.parity_runs("gbs", end=B[1])] == [B[0]]
    assert [r.bucket_start for r in await storage.parity_runs("calls")] == [B[9]]
    assert await storage.parity_runs("nothing") == []


async def test_parity_clean_tail_is_the_clean_runs_after_the_last_unclean_one(
    storage: Storage,
) -> None:
    assert await storage.parity_clean_tail("gbs") == []
    for i in (0, 1):
        await storage.record_parity_run(run(B[i]), [], None)
    assert await storage.parity_clean_tail("gbs") == [B[1], B[0]]
    await storage.record_parity_run(run(B[2], clean=False), [OrgDrift("a", 1, 2)], None)
    assert await storage.parity_clean_tail("gbs") == []
    for i in (4, 3):
        await storage.record_parity_run(run(B[i]), [], None)
    assert await storage.parity_clean_tail("gbs") == [B[4], B[3]]
    # An older unclean bucket checked late does not cut the tail; a newer one does.
    await storage.record_parity_run(run(B[0] - HOUR, clean=False), [], None)
    assert await storage.parity_clean_tail("gbs") == [B[4], B[3]]
    await storage.record_parity_run(run(B[5], clean=False), [], None)
    assert await storage.parity_clean_tail("gbs") == []
    await storage.record_parity_run(run(B[7], meter="calls"), [], None)
    assert await storage.parity_clean_tail("calls") == [B[7]]


# alerts ---------------------------------------------------------------------------------


async def test_parity_alerts_filter_and_record_delivery(storage: Storage) -> None:
    for i, state in ((0, "pending"), (1, "suppressed"), (2, "pending")):
        await storage.record_parity_run(
            run(B[i], clean=False), [], alert(B[i], state=state, at=NOW + 10 * i)
        )
    await storage.record_parity_run(
        run(B[0], meter="calls", clean=False), [], alert(B[0], meter="calls")
    )

    alerts = await storage.parity_alerts("gbs")
    assert [a.bucket_start for a in alerts] == [B[2], B[1], B[0]]
    newest = alerts[0]
    assert newest == msgspec.structs.replace(alert(B[2], at=NOW + 20), id=newest.id)
    assert (newest.attempts, newest.sent_at, newest.error) == (0, None, None)
    assert len({a.id for a in alerts}) == 3

    def buckets(found: list[ParityAlert]) -> list[int]:
        return [a.bucket_start for a in found]

    assert buckets(await storage.parity_alerts("gbs", since=NOW + 10)) == [B[2], B[1]]
    assert buckets(await storage.parity_alerts("gbs", states=["pending"])) == [B[2], B[0]]
    assert buckets(await storage.parity_alerts("gbs", states=["suppressed", "sent"])) == [B[1]]
    assert await storage.parity_alerts("gbs", states=[]) == []
    assert buckets(await storage.parity_alerts("gbs", limit=1)) == [B[2]]
    assert buckets(await storage.parity_alerts("calls")) == [B[0]]

    oldest = alerts[2]
    await storage.update_parity_alert(
        oldest.id, state="pending", attempts=1, sent_at=None, error="timeout"
    )
    await storage.update_parity_alert(
        oldest.id, state="sent", attempts=2, sent_at=NOW + 99, error=None
    )
    updated = {a.id: a for a in await storage.parity_alerts("gbs")}
    assert (updated[oldest.id].state, updated[oldest.id].attempts) == ("sent", 2)
    assert (updated[oldest.id].sent_at, updated[oldest.id].error) == (NOW + 99, None)
    assert updated[newest.id] == newest  # the others are untouched
    assert buckets(await storage.parity_alerts("gbs", states=["pending"])) == [B[2]]


async def test_record_alert_stores_a_jobs_alert_once(storage: Storage) -> None:
    raised = alert(B[3], meter="job:rollup", state="pending", at=NOW)
    alert_id = await storage.record_alert(raised)
    assert isinstance(alert_id, int)
    again = msgspec.structs.replace(raised, text="another text", created_at=NOW + 60)
    assert await storage.record_alert(again) is None
    assert await storage.parity_alerts("job:rollup") == [
        msgspec.structs.replace(raised, id=alert_id)
    ]
    # Another bucket is another alert; other meters never see them.
    later = await storage.record_alert(alert(B[4], meter="job:rollup", at=NOW + 60))
    assert later is not None and later != alert_id
    assert [a.id for a in await storage.parity_alerts("job:rollup")] == [later, alert_id]
    assert await storage.parity_alerts("gbs") == []
    await storage.update_parity_alert(alert_id, state="sent", attempts=1, sent_at=NOW, error=None)
    found = await storage.parity_alerts("job:rollup", states=["sent"])
    assert [(a.id, a.attempts, a.sent_at) for a in found] == [(alert_id, 1, NOW)]


async def test_alerts_of_one_bucket_with_other_keys_are_other_incidents(storage: Storage) -> None:
    """Two orgs' buckets held at the same hour: one alert each (their keys name the org)."""
    first = msgspec.structs.replace(alert(B[3], meter="job:held"), dedup_key="held:o1:b3")
    second = msgspec.structs.replace(first, dedup_key="held:o2:b3", text="o2 held")
    ids = [await storage.record_alert(first), await storage.record_alert(second)]
    assert None not in ids and ids[0] != ids[1]
    assert await storage.record_alert(first) is None  # the same incident again: once
    assert sorted(a.dedup_key for a in await storage.parity_alerts("job:held")) == [
        "held:o1:b3",
        "held:o2:b3",
    ]


@pytest.mark.parametrize("states", [["logged"], ["sent", "logged", "pending"]])
async def test_parity_alerts_in_any_of_several_states(storage: Storage, states: list[str]) -> None:
    for i, state in enumerate(("pending", "sent", "logged", "suppressed")):
        await storage.record_parity_run(run(B[i], clean=False), [], alert(B[i], state=state))
    found = await storage.parity_alerts("gbs", states=states)
    assert sorted(a.state for a in found) == sorted(states)


async def test_reconciliation_runs_are_stored_with_their_findings(storage: Storage) -> None:
    from controlplane.interfaces import Finding, ReconcileRun

    short = Finding("a", "cus_a", "gbs", 7200, ledger=5, provider=3, status="short")
    over = Finding("b", "cus_b", "gbs", 10800, ledger=0, provider=2, status="over")
    first = ReconcileRun(100, 0, 3600, None, 1, 1, 0, 0, True, [])
    second = ReconcileRun(200, 3600, 14400, "a", 2, 3, 2, 2, False, [short, over])
    ids = [await storage.record_reconcile_run(first), await storage.record_reconcile_run(second)]
    assert ids[0] < ids[1]
    assert await storage.reconcile_runs(limit=10) == [
        msgspec.structs.replace(second, id=ids[1]),
        msgspec.structs.replace(first, id=ids[0]),
    ]
    assert len(await storage.reconcile_runs(limit=1)) == 1
