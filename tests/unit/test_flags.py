from __future__ import annotations

import pytest

from controlplane.config import FlagsConfig
from controlplane.errors import ConfigError, FlagRefused
from controlplane.flags.definitions import Authority, parse_authority, parse_bill_from, parse_bool
from controlplane.flags.resolve import resolve, static_layers
from controlplane.flags.service import check
from controlplane.interfaces import RuntimeFlag


def test_layers_default_config_env_runtime() -> None:
    static = static_layers(FlagsConfig(), environ={})
    snap = resolve(static, {})
    assert (snap.shadow, snap.bill_from, snap.authority) == (True, None, Authority.LEGACY)
    assert {v.source for v in snap.values.values()} == {"default"}

    static = static_layers(
        FlagsConfig(shadow=False, authority="edge"), environ={"BILL_FROM": "7200"}
    )
    snap = resolve(static, {})
    assert snap.values["shadow"].source == "config" and snap.shadow is False
    assert snap.values["authority"].source == "config" and snap.authority is Authority.CONTROLPLANE
    assert snap.values["bill_from"].source == "env" and snap.bill_from == 7200

    static = static_layers(FlagsConfig(shadow=False), environ={"SHADOW": "true"})
    snap = resolve(static, {"shadow": RuntimeFlag("shadow", False, 3, 0)})
    assert snap.values["shadow"].source == "runtime" and snap.values["shadow"].version == 3
    assert snap.shadow is False


def test_pro_billing_authority_env_and_aliases() -> None:
    snap = resolve(static_layers(FlagsConfig(), environ={"PRO_BILLING_AUTHORITY": "cell"}), {})
    assert snap.authority is Authority.LEGACY
    assert parse_authority("EDGE") is Authority.CONTROLPLANE
    assert parse_authority("controlplane") is Authority.CONTROLPLANE
    with pytest.raises(ValueError, match="expected 'legacy' or 'controlplane'"):
        parse_authority("stripe")


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment SHADOW: expected true or false"):
        static_layers(FlagsConfig(), environ={"SHADOW": "maybe"})


def test_parsers() -> None:
    assert parse_bool("on") is True and parse_bool("0") is False
    assert parse_bill_from("null") is None and parse_bill_from("3600") == 3600
    for bad in ("soon", True, -5, 1.5):
        with pytest.raises(ValueError):
            parse_bill_from(bad)


def test_legacy_bill_until_is_t_only_under_controlplane_authority() -> None:
    static = static_layers(FlagsConfig(bill_from=7200), environ={})
    assert resolve(static, {}).legacy_bill_until is None
    snap = resolve(static, {"authority": RuntimeFlag("authority", "controlplane", 1, 0)})
    assert snap.legacy_bill_until == 7200
    assert snap.to_api()["legacy_bill_until"] == 7200


def test_bill_from_must_be_bucket_aligned() -> None:
    static = static_layers(FlagsConfig(bill_from=7201), environ={})
    with pytest.raises(FlagRefused) as err:
        check(resolve(static, {}), 3600)
    assert err.value.rule == "bill_from.aligned"
    assert "7200 and 10800" in str(err.value)
    check(resolve(static_layers(FlagsConfig(bill_from=7200), environ={}), {}), 3600)
