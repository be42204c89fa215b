"""Orgs and their plan history, runtime flags, the audit chain and job runs."""

from __future__ import annotations

import itertools

import pytest

from controlplane import audit as audit_chain
from controlplane.errors import FlagRefused
from controlplane.interfaces import (
    AuditEntry,
    AuditRecord,
    FlagWrite,
    JobRun,
    PlanPeriod,
    RuntimeFlag,
    Storage,
)
from controlplane.ledger import RowState
from tests.contract.conftest import Store
from tests.contract.helpers import NOW, UNIT, B, claim, entry, event, roll, settlement


async def set_org(
    storage: Storage,
    org: str,
    *,
    customer: str | None = None,
    plan: str | None = None,
    effective_from: int = 0,
    at: int = NOW,
):
    return await storage.set_org(
        org,
        customer=customer,
        plan=plan,
        effective_from=effective_from,
        at=at,
        audit=entry("org.set", org, after={"customer": customer, "plan": plan}),
    )


# orgs -----------------------------------------------------------------------------------


async def test_set_org_keeps_a_plan_history(store: Store, storage: Storage) -> None:
    assert await storage.get_org("a") is None
    org = await set_org(storage, "a", plan="free", effective_from=B[0], at=NOW)
    assert (org.org_id, org.customer, org.updated_at) == ("a", None, NOW)
    assert org.plans == [PlanPeriod("free", B[0])]
    assert (org.subscription, org.subscription_status) == (None, None)

    org = await set_org(storage, "a", customer="cus_1", plan="pro", effective_from=B[2], at=NOW + 1)
    assert org.customer == "cus_1"
    assert org.plans == [PlanPeriod("free", B[0]), PlanPeriod("pro", B[2])]
    assert (org.plan_at(B[0] - 1), org.plan_at(B[1]), org.plan_at(B[2])) == (None, "free", "pro")

    # No customer and no plan: both kept, only the time moves.
    org = await set_org(storage, "a", at=NOW + 2)
    assert (org.customer, org.updated_at, len(org.plans)) == ("cus_1", NOW + 2, 2)
    # A period starting where one starts replaces it; an older one goes first.
    await set_org(storage, "a", plan="enterprise", effective_from=B[2], at=NOW + 3)
    org = await set_org(storage, "a", plan="trial", effective_from=0, at=NOW + 4)
    assert org.plans == [
        PlanPeriod("trial", 0),
        PlanPeriod("free", B[0]),
        PlanPeriod("enterprise", B[2]),
    ]
    other = await store.open()
    assert await other.get_org("a") == org
    assert await storage.get_org("b") is None

    audit = await storage.audit_log(action_prefix="org.set")
    assert [a.subject for a in audit] == ["a"] * 5
    assert [a.at for a in audit] == [NOW + 4, NOW + 3, NOW + 2, NOW + 1, NOW]
    assert audit[-1].after == {"customer": None, "plan": "free"}


async def test_orgs_without_customer_follow_the_plan_in_force(storage: Storage) -> None:
    await set_org(storage, "a", plan="pro", effective_from=B[0])  # pro, no customer
    await set_org(storage, "b", customer="cus_b", plan="pro", effective_from=B[0])
    await set_org(storage, "c", plan="free", effective_from=B[0])
    await set_org(storage, "c", plan="pro", effective_from=B[2])
    await set_org(storage, "d", plan="pro", effective_from=B[0])
    await set_org(storage, "d", plan="free", effective_from=B[2])
    await set_org(storage, "e")  # no plan at all

    async def lacking(plan: str, at: int) -> list[str]:
        return sorted(await storage.orgs_without_customer(plan, at))

    assert await lacking("pro", B[0] - 1) == []
    assert await lacking("pro", B[0]) == ["a", "d"]
    assert await lacking("pro", B[1]) == ["a", "d"]
    assert await lacking("pro", B[2]) == ["a", "c"]
    assert await lacking("free", B[1]) == ["c"]
    assert await lacking("free", B[3]) == ["d"]
    await set_org(storage, "a", customer="cus_a")
    assert await lacking("pro", B[3]) == ["c"]


# flags ----------------------------------------------------------------------------------


async def test_write_flags_versions_each_flag(store: Store, storage: Storage) -> None:
    assert await storage.runtime_flags() == {}
    written = await storage.write_flags(
        [FlagWrite("shadow", False, 0), FlagWrite("bill_from", B[0], 0)],
        [entry("flag.set", "shadow", before=True, after=False)],
        NOW,
    )
    assert written == {
        "shadow": RuntimeFlag("shadow", False, 1, NOW),
        "bill_from": RuntimeFlag("bill_from", B[0], 1, NOW),
    }
    assert await storage.runtime_flags() == written

    await storage.write_flags(
        [FlagWrite("bill_from", None, 1), FlagWrite("authority", "controlplane", 0)], [], NOW + 5
    )
    flags = await (await store.open()).runtime_flags()
    assert flags == {
        "shadow": RuntimeFlag("shadow", False, 1, NOW),
        "bill_from": RuntimeFlag("bill_from", None, 2, NOW + 5),
        "authority": RuntimeFlag("authority", "controlplane", 1, NOW + 5),
    }
    (record,) = await storage.audit_log(action_prefix="flag.")
    assert (record.subject, record.before, record.after, record.at) == ("shadow", True, False, NOW)


@pytest.mark.parametrize("stale", [0, 1, 3], ids=["new-but-set", "behind", "ahead"])
async def test_a_stale_flag_write_is_refused_and_changes_nothing(
    storage: Storage, stale: int
) -> None:
    await storage.write_flags([FlagWrite("shadow", True, 0)], [entry("flag.set")], NOW)
    await storage.write_flags([FlagWrite("shadow", False, 1)], [entry("flag.set")], NOW + 1)
    flags, audit = await storage.runtime_flags(), await storage.audit_log()

    with pytest.raises(FlagRefused) as refused:
        await storage.write_flags(
            # The first write alone would be fine: the batch is all or nothing.
            [FlagWrite("authority", "controlplane", 0), FlagWrite("shadow", True, stale)],
            [entry("flag.set", "authority"), entry("flag.set", "shadow")],
            NOW + 2,
        )
    assert refused.value.rule == "version"
    assert await storage.runtime_flags() == flags
    assert await storage.audit_log() == audit


# audit ----------------------------------------------------------------------------------


def oldest_first(records: list[AuditRecord]) -> list[AuditRecord]:
    return sorted(records, key=lambda r: r.id)


async def test_audit_log_is_newest_first_and_round_trips_every_field(storage: Storage) -> None:
    first = AuditEntry(
        action="flag.set",
        subject="bill_from",
        actor="alice",
        reason="cutover",
        before=None,
        after={"value": B[0], "nested": {"list": [1, "two", None, True]}, "big": 10**15},
        forced=True,
        group_id="g-1",
    )
    second = AuditEntry(
        action="flag.set", subject="shadow", actor="alice", before=True, after=False
    )
    third = AuditEntry(action="catalog.publish", subject="catalog", actor="bob", after=["x"])
    await storage.append_audit([first, second], NOW)
    await storage.append_audit([], NOW + 1)  # nothing to write
    await storage.append_audit([third], NOW + 2)

    log = await storage.audit_log()
    assert [r.action for r in log] == ["catalog.publish", "flag.set", "flag.set"]
    assert [r.id for r in log] == sorted((r.id for r in log), reverse=True)
    newest, middle, oldest = log
    assert (newest.at, newest.after, newest.actor, newest.forced) == (NOW + 2, ["x"], "bob", False)
    assert (middle.subject, middle.before, middle.after) == ("shadow", True, False)
    assert (oldest.subject, oldest.actor, oldest.reason, oldest.at) == (
        "bill_from",
        "alice",
        "cutover",
        NOW,
    )
    assert (oldest.before, oldest.after, oldest.forced, oldest.group_id) == (
        None,
        first.after,
        True,
        "g-1",
    )
    assert (middle.reason, middle.group_id, middle.forced) == (None, None, False)

    assert [r.subject for r in await storage.audit_log(action_prefix="flag.")] == [
        "shadow",
        "bill_from",
    ]
    assert await storage.audit_log(action_prefix="catalog") == [newest]
    # a plain, case-sensitive prefix: no wildcards
    assert await storage.audit_log(action_prefix="FLAG.") == []
    assert await storage.audit_log(action_prefix="flag_") == []
    assert await storage.audit_log(action_prefix="nothing.") == []
    assert await storage.audit_log(limit=2) == log[:2]


async def test_audit_records_form_one_hash_chain_across_every_writer(
    storage: Storage,
) -> None:
    """Each record's prev_hash is the previous record's hash, from genesis on, whichever
    method wrote it; and each hash covers the record (controlplane.audit.verify)."""
    await storage.append_audit([entry("a.one"), entry("a.two", before={"k": 1})], NOW)
    await storage.write_flags([FlagWrite("shadow", False, 0)], [entry("flag.set")], NOW + 1)
    await set_org(storage, "a", plan="pro", customer="cus_a")
    await storage.publish_catalog({"prices": {}}, "d1", "bob", NOW + 2, entry("catalog.publish"))
    await storage.insert_events([event("e1", "a", B[0], UNIT)], 3600)
    assert len(await roll(storage)) == 1
    (item,) = await storage.sendable(0, 10, claim=claim("s"))
    await storage.settle([settlement(item.row, RowState.SENT, customer="cus_a")], NOW, "s")
    await storage.cancel_rows([item.row.id], NOW + 3, "ops", "rolled_back")
    await storage.append_audit([entry("a.last", forced=True)], NOW + 4)

    chain = oldest_first(await storage.audit_log(limit=1000))
    assert [r.action for r in chain] == [
        "a.one",
        "a.two",
        "flag.set",
        "org.set",
        "catalog.publish",
        "ledger.sent",
        "ledger.cancelled",
        "a.last",
    ]
    assert chain[0].prev_hash == audit_chain.GENESIS
    for before, after in itertools.pairwise(chain):
        assert after.prev_hash == before.hash
    assert len({r.hash for r in chain}) == len(chain)
    assert audit_chain.verify(chain) is None


# jobs -----------------------------------------------------------------------------------


async def test_job_runs_are_newest_first_and_filtered_by_job(storage: Storage) -> None:
    runs = [
        JobRun("rollup", 1_767_225_600.123456, 1_767_225_601.5, "ok", {"buckets": 3, "rows": 7}),
        JobRun("sender", 1_767_225_602.25, 1_767_225_602.75, "error", {}, "provider down"),
        JobRun("rollup", 1_767_225_660.0, 1_767_225_660.001, "skipped", {"rows": 0}),
    ]
    for run in runs:
        await storage.record_job_run(run)
    assert await storage.job_runs() == runs[::-1]
    assert await storage.job_runs("rollup") == [runs[2], runs[0]]
    assert await storage.job_runs("sender", limit=5) == [runs[1]]
    assert await storage.job_runs(limit=2) == [runs[2], runs[1]]
    assert await storage.job_runs("parity") == []


async def test_last_job_success_skips_failed_runs(storage: Storage) -> None:
    assert await storage.last_job_success("rollup") is None
    await storage.record_job_run(JobRun("rollup", 100.0, 101.5, "error", {}, "boom"))
    assert await storage.last_job_success("rollup") is None
    await storage.record_job_run(JobRun("rollup", 200.0, 201.25, "ok", {}))
    await storage.record_job_run(JobRun("rollup", 300.0, 301.0, "error", {}, "boom"))
    await storage.record_job_run(JobRun("sender", 400.0, 401.0, "ok", {}))
    assert await storage.last_job_success("rollup") == 201.25
    await storage.record_job_run(JobRun("rollup", 500.0, 500.125, "skipped", {}))
    assert await storage.last_job_success("rollup") == 500.125
    assert await storage.last_job_success("sender") == 401.0
    assert await storage.last_job_success("parity") is None
