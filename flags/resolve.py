"""Layered resolution: default < config < environment < runtime."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from controlplane.config import FlagsConfig
from controlplane.errors import ConfigError
from controlplane.flags.definitions import FLAGS, Authority, to_json
from controlplane.interfaces import RuntimeFlag

Source = Literal["default", "config", "env", "runtime"]


class FlagValue(msgspec.Struct, frozen=True):
    value: Any
    source: Source
    version: int  # runtime version; 0 when the flag has never been set at runtime


class Snapshot(msgspec.Struct, frozen=True):
    """Every flag's value at one moment; each job reads one snapshot per run."""

    values: dict[str, FlagValue]

    @property
    def shadow(self) -> bool:
        return bool(self.values["shadow"].value)

    @property
    def bill_from(self) -> int | None:
        value = self.values["bill_from"].value
        return int(value) if value is not None else None

    @property
    def authority(self) -> Authority:
        return Authority(self.values["authority"].value)

    @property
    def sending(self) -> bool:
        """True when the control plane is the biller and not in shadow."""
        return not self.shadow and self.authority is Authority.CONTROLPLANE

    @property
    def legacy_bill_until(self) -> int | None:
        """The legacy biller bills buckets starting before this (T once we are authority)."""
        return self.bill_from if self.authority is Authority.CONTROLPLANE else None

    def to_api(self) -> dict[str, Any]:
        return {
            "flags": {
                name: {"value": to_json(v.value), "source": v.source, "version": v.version}
                for name, v in self.values.items()
            },
            "legacy_bill_until": self.legacy_bill_until,
        }


def static_layers(
    config: FlagsConfig, environ: Mapping[str, str] | None = None
) -> dict[str, FlagValue]:
    """Default, config and environment layers. Raises ConfigError naming a bad value."""
    environ = os.environ if environ is None else environ
    out: dict[str, FlagValue] = {}
    for name, spec in FLAGS.items():
        value, source = spec.default, "default"
        configured = getattr(config, name)
        if configured is not None:
            try:
                value, source = spec.parse(configured), "config"
            except ValueError as exc:
                raise ConfigError(f"flags.{name}: {exc}") from exc
        for var in spec.env:
            if var in environ:
                try:
                    value, source = spec.parse(environ[var]), "env"
                except ValueError as exc:
                    raise ConfigError(f"environment {var}: {exc}") from exc
                break
        out[name] = FlagValue(value=value, source=source, version=0)  # type: ignore[arg-type]
    return out


def resolve(static: Mapping[str, FlagValue], runtime: Mapping[str, RuntimeFlag]) -> Snapshot:
    values = dict(static)
    for name, stored in runtime.items():
        spec = FLAGS.get(name)
        if spec is not None:
            values[name] = FlagValue(
                value=spec.parse(stored.value), source="runtime", version=stored.version
            )
    return Snapshot(values=values)


def alias_free(value: Any) -> Any:
    return to_json(value) if isinstance(value, Authority) else value
