"""The docs cover what users can set: a new setting, flag or command without docs fails here."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from controlplane import config as config_mod
from controlplane.cli import build_parser
from controlplane.flags import FLAGS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _fields(struct: type) -> list[str]:
    return [f.name for f in msgspec.inspect.type_info(struct).fields]  # type: ignore[attr-defined]


SECTIONS = {
    "server": config_mod.ServerConfig,
    "events": config_mod.EventsConfig,
    "auth.tokens": config_mod.TokenConfig,
    "rollup": config_mod.RollupConfig,
    "sender": config_mod.SenderConfig,
    "flags": config_mod.FlagsConfig,
    "logging": config_mod.LoggingConfig,
    "meters": config_mod.MeterConfig,
    "plans": config_mod.PlanConfig,
    "parity": config_mod.ParityConfig,
    "parity.alert": config_mod.ParityAlertConfig,
    "catalog": config_mod.CatalogConfig,
    "catalog.products": config_mod.CatalogProductConfig,
    "catalog.prices": config_mod.CatalogPriceConfig,
    "catalog.welcome_credit": config_mod.WelcomeCreditConfig,
    "stripe": config_mod.StripeConfig,
    "stripe.plan_policy": config_mod.PlanPolicyConfig,
    "cutover": config_mod.CutoverConfig,
    "rate_limit": config_mod.RateLimitConfig,
    "jobs": config_mod.JobsConfig,
    "audit": config_mod.AuditConfig,
    "capabilities": config_mod.CapabilitiesConfig,
    "capabilities.keys": config_mod.CapabilityKeyConfig,
    "reconcile": config_mod.ReconcileConfig,
}


def test_every_config_section_is_checked_here() -> None:
    plugin_sections = set(config_mod.PLUGIN_SECTIONS) | {"ingest"}  # checked per plugin below
    sections = set(_fields(config_mod.Config)) - plugin_sections - {"source"}
    assert sections <= {name.split(".")[0] for name in SECTIONS}


def _plugin_configs() -> dict[str, type]:
    from controlplane.registry import BUILTIN, spec_for

    out: dict[str, type] = {}
    for kind in ("storage", "ingest", "billing", "legacy"):
        for name in BUILTIN[kind]:  # type: ignore[literal-required]
            out[f"{kind}.{name}"] = spec_for(kind, name).config  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_setting_has_a_row_in_the_configuration_reference(section: str) -> None:
    text = (DOCS / "reference" / "configuration.md").read_text()
    missing = [f for f in _fields(SECTIONS[section]) if f"| `{f}` |" not in text]
    assert not missing, (
        f"[{section}] settings missing from docs/reference/configuration.md: {missing}"
    )


def test_every_plugin_setting_is_documented() -> None:
    text = (DOCS / "reference" / "configuration.md").read_text()
    for plugin, struct in _plugin_configs().items():
        missing = [f for f in _fields(struct) if f"| `{f}` |" not in text]
        assert not missing, f"{plugin} settings missing from the configuration reference: {missing}"


def test_every_flag_is_documented() -> None:
    text = (DOCS / "reference" / "flags.md").read_text()
    for name, spec in FLAGS.items():
        assert f"| `{name}` |" in text
        for var in spec.env:
            assert f"`{var}`" in text


def test_every_cli_command_is_documented() -> None:
    text = (DOCS / "reference" / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        commands = [f"{name} {n}" for n in nested[0].choices] if nested else [name]
        for command in commands:
            assert f"`{command}" in text, (
                f"`controlplane {command}` is not in docs/reference/cli.md"
            )
