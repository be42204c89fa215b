"""The flag guards: each rule refuses with its name and changes nothing; force overrides."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import ConfigError, FlagRefused
from controlplane.flags import FlagChange
from controlplane.flags.resolve import resolve, static_layers
from controlplane.flags.service import check
from tests.conftest import HOUR, T0, tick

LIVE = [FlagChange("authority", "controlplane"), FlagChange("shadow", False)]


async def refused(cp: ControlPlane, changes: list[FlagChange], rule: str) -> None:
    before = await cp.flags()
    audit = await cp.storage.audit_log(action_prefix="flag.")
    with pytest.raises(FlagRefused) as info:
        await cp.set_flags(changes, actor="t", reason="r")
    assert info.value.rule == rule
    assert await cp.flags() == before
    assert await cp.storage.audit_log(action_prefix="flag.") == audit


async def test_bill_from_must_be_aligned(cp: ControlPlane) -> None:
    await refused(cp, [FlagChange("bill_from", T0 + 5)], "bill_from.aligned")


async def test_bill_from_must_be_inside_the_providers_window(cp: ControlPlane) -> None:
    now = cp.now() - cp.now() % HOUR
    await refused(cp, [FlagChange("bill_from", now - 36 * 86400)], "bill_from.window")
    flags = await cp.set_flags(
        [FlagChange("bill_from", now - 34 * 86400)], actor="t", reason="inside"
    )
    assert flags.bill_from == now - 34 * 86400


async def test_window_uses_the_billing_plugins_max_age(cp: ControlPlane) -> None:
    assert cp.billing is not None
    type(cp.billing).max_event_age_seconds = 2 * 86400
    try:
        await refused(cp, [FlagChange("bill_from", T0 - 2 * 86400)], "bill_from.window")
    finally:
        type(cp.billing).max_event_age_seconds = 35 * 86400


@pytest.mark.parametrize(
    "changes",
    [
        [FlagChange("shadow", False)],
        [FlagChange("shadow", False), FlagChange("bill_from", T0)],
        [FlagChange("shadow", False), FlagChange("authority", "controlplane")],
    ],
)
async def test_shadow_off_requires_bill_from_and_authority(
    cp: ControlPlane, changes: list[FlagChange]
) -> None:
    await refused(cp, changes, "shadow.off_requires")


async def test_shadow_off_passes_when_the_three_change_together(cp: ControlPlane) -> None:
    flags = await cp.set_flags([*LIVE, FlagChange("bill_from", T0)], actor="t", reason="go")
    assert flags.sending and flags.legacy_bill_until == T0
    groups = {r.group_id for r in await cp.storage.audit_log(action_prefix="flag.")}
    assert len(groups) == 1 and None not in groups


async def _send_one(cp: ControlPlane) -> None:
    await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
    await cp.ingest([tick("e1", "o1", T0 + 10)], "http")
    await cp.rollup()
    await cp.set_flags([*LIVE, FlagChange("bill_from", T0)], actor="t", reason="go")
    stats = await cp.send()
    assert stats.sent == 1


async def test_bill_from_is_frozen_once_rows_were_sent(cp: ControlPlane) -> None:
    await _send_one(cp)
    await refused(cp, [FlagChange("bill_from", T0 + HOUR)], "bill_from.frozen")


async def test_authority_back_to_legacy_goes_through_rollback(cp: ControlPlane) -> None:
    await _send_one(cp)
    await refused(
        cp,
        [FlagChange("authority", "legacy"), FlagChange("shadow", True)],
        "authority.legacy_via_rollback",
    )
    flags = await cp.set_flags(
        [FlagChange("authority", "legacy"), FlagChange("shadow", True)],
        actor="t",
        reason="back",
        via="rollback",
    )
    assert not flags.sending
    latest = (await cp.storage.audit_log(action_prefix="flag."))[0]
    assert latest.reason == "back [via rollback]"


async def test_authority_back_to_legacy_is_free_when_nothing_was_sent(cp: ControlPlane) -> None:
    await cp.set_flags([*LIVE, FlagChange("bill_from", T0)], actor="t", reason="go")
    flags = await cp.set_flags(
        [FlagChange("authority", "legacy"), FlagChange("shadow", True)], actor="t", reason="b"
    )
    assert flags.authority.value == "legacy"


async def test_force_overrides_and_is_audited_as_forced(cp: ControlPlane) -> None:
    flags = await cp.set_flags(
        [FlagChange("shadow", False)], actor="t", reason="lab only", force=True
    )
    assert flags.shadow is False
    latest = (await cp.storage.audit_log(action_prefix="flag."))[0]
    assert latest.forced and latest.reason == "lab only"


async def test_attempted_rows_also_freeze_bill_from(cp: ControlPlane) -> None:
    await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
    await cp.ingest([tick("e1", "o1", T0 + 10)], "http")
    await cp.rollup()
    await cp.set_flags([*LIVE, FlagChange("bill_from", T0)], actor="t", reason="go")
    (row,) = await cp.storage.ledger()
    await cp.storage.record_attempts([row.id], cp.now())
    await refused(cp, [FlagChange("bill_from", T0 + HOUR)], "bill_from.frozen")


async def test_after_a_rollback_a_new_cutover_needs_a_t_after_the_rows_sent(
    cp: ControlPlane,
) -> None:
    await _send_one(cp)  # the row of bucket T0 is sent
    await cp.set_flags(
        [FlagChange("authority", "legacy"), FlagChange("shadow", True)],
        actor="t",
        reason="back",
        via="rollback",
    )
    # The legacy biller bills bucket T0 now: neither the same T nor an earlier one.
    await refused(cp, LIVE, "bill_from.frozen")
    await refused(cp, [FlagChange("bill_from", T0 - HOUR)], "bill_from.frozen")
    await refused(cp, [*LIVE, FlagChange("bill_from", T0 - HOUR)], "bill_from.frozen")
    flags = await cp.set_flags(
        [*LIVE, FlagChange("bill_from", T0 + HOUR)], actor="t", reason="again"
    )
    assert flags.sending and flags.legacy_bill_until == T0 + HOUR


# startup -------------------------------------------------------------------------------------


def test_static_values_pass_the_same_rules() -> None:
    from controlplane.config import FlagsConfig

    static = static_layers(FlagsConfig(shadow=False), environ={})
    with pytest.raises(FlagRefused) as info:
        check(resolve(static, {}), HOUR)
    assert info.value.rule == "shadow.off_requires"


@pytest.mark.parametrize(
    ("flags", "rule"),
    [
        ({"bill_from": T0 + 1}, "bill_from.aligned"),
        ({"shadow": False}, "shadow.off_requires"),
        ({"shadow": False, "bill_from": T0}, "shadow.off_requires"),
    ],
)
def test_the_control_plane_refuses_to_start_on_unsafe_static_flags(
    make_config: Callable[..., Config], flags: dict[str, object], rule: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(rule)):
        ControlPlane(make_config(flags=flags))


def test_environment_values_are_checked_at_startup(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOW", "false")
    with pytest.raises(ConfigError, match=r"shadow\.off_requires"):
        ControlPlane(make_config())
    monkeypatch.setenv("PRO_BILLING_AUTHORITY", "controlplane")
    monkeypatch.setenv("BILL_FROM", str(T0))
    ControlPlane(make_config())  # a consistent live state starts
