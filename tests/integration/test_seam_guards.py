"""The seam between the two billers holds on every path that moves a flag (issue: flag paths
that bill twice), on both storage backends:

- a second cutover cannot reach back over rows handed back by a rollback, whatever order the
  unforced flag changes come in;
- a flag change and a send pass recording its attempts are serialized: whichever commits
  first, the other sees it (the guard runs in the write's transaction, the sender re-checks
  the flags in the transaction that records its attempts);
- a change in the config file or the environment passes the same guards as a runtime change
  and is audited; refused, the control plane does not start.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from controlplane.core import ControlPlane
from controlplane.errors import ConfigError, FlagRefused
from controlplane.flags import FlagChange
from controlplane.interfaces import Delivery, MeterEvent
from controlplane.ledger import RowState
from controlplane.plugins.billing.fake import FakeBilling
from tests.conftest import HOUR, T0, tick

T = T0 + 4 * HOUR  # the clock fixture reads T0 + 10 h
LIVE = {"SHADOW": "false", "BILL_FROM": str(T), "PRO_BILLING_AUTHORITY": "controlplane"}


@pytest.fixture
async def cp(build_on_each_backend: Callable[..., ControlPlane]) -> AsyncIterator[ControlPlane]:
    async with build_on_each_backend() as plane:
        await plane.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
        yield plane


async def three_buckets(cp: ControlPlane) -> None:
    await cp.ingest([tick(f"e{i}", "o1", T + i * HOUR + 5) for i in range(3)], "http")
    await cp.rollup(until=T + 3 * HOUR)


async def set_flag(cp: ControlPlane, name: str, value: Any) -> None:
    await cp.set_flags([FlagChange(name, value)], actor="ops", reason="step")


# a second cutover -----------------------------------------------------------------------------


async def test_a_second_cutover_cannot_reach_back_over_rows_handed_back(
    cp: ControlPlane, fake_billing: FakeBilling
) -> None:
    await three_buckets(cp)
    await cp.cutover.execute(T, actor="ops", reason="go", force=True)
    assert (await cp.send()).sent == 3
    result = await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    assert len(result.cancelled) == 3
    calls = len(fake_billing.calls)

    # The path that went around the guard: move T far ahead, cut over there, then move T
    # back over the handed-back buckets while the control plane is the authority.
    t3 = T + 48 * HOUR
    await set_flag(cp, "bill_from", t3)
    await set_flag(cp, "authority", "controlplane")
    with pytest.raises(FlagRefused) as info:
        await set_flag(cp, "bill_from", T)
    assert info.value.rule == "bill_from.frozen"
    assert (await cp.flags()).bill_from == t3
    # Any T at or before the handed-back rows is refused, from either authority.
    with pytest.raises(FlagRefused, match=r"bill_from\.frozen"):
        await set_flag(cp, "bill_from", T + 2 * HOUR)

    await set_flag(cp, "shadow", False)
    await cp.send()
    assert len(fake_billing.calls) == calls  # nothing before t3 went out again
    assert all(r.state is RowState.CANCELLED for r in await cp.storage.ledger())


async def test_moving_t_earlier_while_live_is_refused_over_rows_sent_after_it(
    cp: ControlPlane,
) -> None:
    await three_buckets(cp)
    await cp.cutover.execute(T + HOUR, actor="ops", reason="go", force=True)
    assert (await cp.send()).sent == 2
    with pytest.raises(FlagRefused, match=r"bill_from\.frozen"):
        await set_flag(cp, "bill_from", T)


# the guard and the send pass ------------------------------------------------------------------


async def test_a_flag_change_between_claim_and_attempt_stops_the_send_pass(
    cp: ControlPlane, fake_billing: FakeBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flag write commits after the sender read its flags and claimed its rows, before
    it recorded its attempts: the guard sees nothing sent, so the move is allowed, and the
    sender must then send nothing under the T it read."""
    await three_buckets(cp)
    await cp.cutover.execute(T, actor="ops", reason="go", force=True)
    record = cp.storage.record_attempts

    async def moved_first(*args: Any, **kw: Any) -> dict[int, int]:
        await set_flag(cp, "bill_from", T + 3 * HOUR)
        return await record(*args, **kw)

    monkeypatch.setattr(cp.storage, "record_attempts", moved_first)
    stats = await cp.send()
    assert stats.sent == 0 and stats.skipped is not None
    assert fake_billing.calls == []
    rows = await cp.storage.ledger()
    assert [(r.state, r.attempts) for r in rows] == [(RowState.PENDING, 0)] * 3
    assert (await cp.flags()).legacy_bill_until == T + 3 * HOUR


async def test_a_flag_change_after_the_attempts_are_recorded_is_refused(
    cp: ControlPlane, fake_billing: FakeBilling
) -> None:
    """The other order: the attempts commit first, so the guard in the flag write's
    transaction sees rows the provider may have, and refuses the move."""
    await three_buckets(cp)
    await cp.cutover.execute(T, actor="ops", reason="go", force=True)
    refusals: list[str] = []
    send = fake_billing.send

    async def move_during_the_call(event: MeterEvent) -> Delivery:
        if not refusals:
            try:
                await set_flag(cp, "bill_from", T + 3 * HOUR)
            except FlagRefused as exc:
                refusals.append(exc.rule)
        return await send(event)

    fake_billing.send = move_during_the_call  # type: ignore[method-assign]
    assert (await cp.send()).sent == 3
    assert refusals == ["bill_from.frozen"]
    assert (await cp.flags()).bill_from == T


# the config file and environment layers ---------------------------------------------------------


async def live_from_the_environment(
    build_on_each_backend: Callable[..., ControlPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in LIVE.items():
        monkeypatch.setenv(name, value)
    async with build_on_each_backend() as cp:
        await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
        await three_buckets(cp)
        assert (await cp.send()).sent == 3


async def test_a_start_records_and_audits_the_static_layers(
    build_on_each_backend: Callable[..., ControlPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    await live_from_the_environment(build_on_each_backend, monkeypatch)
    async with build_on_each_backend() as cp:
        audit = await cp.storage.audit_log(action_prefix="flag.")
    assert {(a.subject, a.actor) for a in audit} == {
        ("shadow", "environment"),
        ("bill_from", "environment"),
        ("authority", "environment"),
    }
    assert len(audit) == 3  # a restart with the same layers records nothing new


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"BILL_FROM": str(T + HOUR)}, "bill_from.frozen"),
        ({"PRO_BILLING_AUTHORITY": "legacy", "SHADOW": "true"}, "authority.legacy_via_rollback"),
    ],
)
async def test_an_environment_change_over_sent_rows_is_refused_at_start(
    build_on_each_backend: Callable[..., ControlPlane],
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, str],
    rule: str,
) -> None:
    await live_from_the_environment(build_on_each_backend, monkeypatch)
    for name, value in change.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rule):
        async with build_on_each_backend():
            pass
    for name in change:  # undone: it starts, and nothing was recorded meanwhile
        monkeypatch.setenv(name, LIVE[name])
    async with build_on_each_backend() as cp:
        assert (await cp.flags()).legacy_bill_until == T
        assert len(await cp.storage.audit_log(action_prefix="flag.")) == 3


async def test_a_config_file_change_is_guarded_and_audited_like_a_runtime_one(
    build_on_each_backend: Callable[..., ControlPlane],
) -> None:
    flags = {"shadow": False, "bill_from": T, "authority": "controlplane"}
    async with build_on_each_backend(flags=flags) as cp:
        await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
        await three_buckets(cp)
        assert (await cp.send()).sent == 3
    with pytest.raises(ConfigError, match=r"bill_from\.frozen"):
        async with build_on_each_backend(flags={**flags, "bill_from": T + 2 * HOUR}):
            pass
    # A change the rules allow starts, and is audited with the layer it came from.
    async with build_on_each_backend(flags={**flags, "shadow": True}) as cp:
        assert (await cp.flags()).shadow is True
        (last, *_) = await cp.storage.audit_log(action_prefix="flag.")
    assert (last.subject, last.actor, last.before, last.after) == (
        "shadow",
        "config file",
        False,
        True,
    )


# what a rollback hands back ---------------------------------------------------------------------


async def test_fractions_of_rows_handed_back_do_not_leak_into_the_next_cutover(
    cp: ControlPlane, fake_billing: FakeBilling
) -> None:
    await cp.set_org("o2", customer="cus_2", plan="pro", actor="t", effective_from=0)
    # o1: 2.79 units at T, sent as 2 (0.79 carried); o2: 0.19 units, sent as 0 without a call
    await cp.ingest([tick("a", "o1", T + 5, mb=143), tick("b", "o2", T + 5, mb=10)], "http")
    await cp.rollup(until=T + HOUR)
    await cp.cutover.execute(T, actor="ops", reason="go", force=True)
    assert (await cp.send()).sent == 2
    assert [e.value for e in fake_billing.calls] == [2]

    result = await cp.cutover.rollback(actor="ops", reason="bad", cancel_sent=True)
    assert {r.org_id: r.note for r in result.cancelled} == {
        "o1": None,
        "o2": "never delivered (below one unit): handed back without a call",
    }
    assert result.not_cancelled == []
    assert {r.state for r in await cp.storage.ledger()} == {RowState.CANCELLED}

    # A second cutover after them: 2.79 units more for o1 are billed as 2, not 3.
    t2 = T + 2 * HOUR
    await cp.ingest([tick("c", "o1", t2 + 5, mb=143)], "http")
    await cp.rollup(until=t2 + HOUR)
    await cp.cutover.execute(t2, actor="ops", reason="again", force=True)
    assert (await cp.send()).sent == 1
    assert [e.value for e in fake_billing.calls] == [2, 2]


async def test_replicas_starting_together_record_the_static_layers_once(
    build_on_each_backend: Callable[..., ControlPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that read the record before another wrote it is refused by the write's
    version check, reads again, finds it done, and starts."""
    for name, value in LIVE.items():
        monkeypatch.setenv(name, value)
    async with build_on_each_backend():
        pass  # the first replica records the layers
    late = build_on_each_backend()
    reads = 0
    read = late.storage.static_flags

    async def stale_once() -> Any:
        nonlocal reads
        reads += 1
        return None if reads == 1 else await read()  # as before the first replica wrote

    monkeypatch.setattr(late.storage, "static_flags", stale_once)
    async with late as cp:
        assert (await cp.flags()).legacy_bill_until == T
        assert len(await cp.storage.audit_log(action_prefix="flag.")) == 3  # recorded once
    assert reads == 2


async def test_clearing_t_while_live_is_a_move_too(cp: ControlPlane) -> None:
    """Shadow on, T cleared, T set again later, shadow off: the cleared T would have let the
    buckets already sent go to the legacy biller as well."""
    await three_buckets(cp)
    await cp.cutover.execute(T, actor="ops", reason="go", force=True)
    assert (await cp.send()).sent == 3
    await set_flag(cp, "shadow", True)
    with pytest.raises(FlagRefused, match=r"bill_from\.frozen"):
        await set_flag(cp, "bill_from", None)
    assert (await cp.flags()).bill_from == T
