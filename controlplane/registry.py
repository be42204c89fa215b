"""One registry for every plugin, built-in or third-party.

A plugin is a :class:`PluginSpec`: its kind, its name (the `backend` value in config), its
config struct and a factory. Built-in plugins are listed here by module path, so an optional
driver is only imported when its plugin is chosen. Third-party packages add theirs through the
entry-point group ``controlplane.plugins``, each entry point naming a PluginSpec::

    [project.entry-points."controlplane.plugins"]
    mydb = "mypackage.storage:spec"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Literal

import msgspec
import structlog

from controlplane.errors import ConfigError

Kind = Literal["storage", "ingest", "billing", "legacy"]
KINDS: tuple[Kind, ...] = ("storage", "ingest", "billing", "legacy")
ENTRY_POINT_GROUP = "controlplane.plugins"

log = structlog.get_logger(__name__)


class PluginSpec(msgspec.Struct, frozen=True):
    kind: Kind
    name: str
    config: type[Any]  # a PluginConfig subclass tagged with `name` on field `backend`
    factory: Callable[..., Any]  # called with the decoded config (and keyword context)


# kind -> name -> "module:attribute" of its PluginSpec
BUILTIN: dict[Kind, dict[str, str]] = {
    "storage": {
        "postgres": "controlplane.plugins.storage.postgres:spec",
        "sqlite": "controlplane.plugins.storage.sqlite:spec",
    },
    "ingest": {
        "redis_streams": "controlplane.plugins.ingest.redis_streams:spec",
    },
    "billing": {
        "fake": "controlplane.plugins.billing.fake:spec",
        "stripe": "controlplane.plugins.billing.stripe:spec",
    },
    "legacy": {
        "sql": "controlplane.plugins.legacy.sql:spec",
        "http": "controlplane.plugins.legacy.http:spec",
    },
}


def _load(path: str) -> PluginSpec:
    module_name, _, attr = path.partition(":")
    spec = getattr(importlib.import_module(module_name), attr)
    if not isinstance(spec, PluginSpec):
        raise ConfigError(f"{path} is not a controlplane PluginSpec")
    return spec


def names(kind: Kind) -> list[str]:
    """Every plugin name of `kind`, built-in and from entry points, without importing them."""
    found = set(BUILTIN[kind])
    found.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(found)


@cache
def spec_for(kind: Kind, name: str) -> PluginSpec:
    """The plugin of `kind` called `name`; only that plugin's module is imported."""
    if name in BUILTIN[kind]:
        return _load(BUILTIN[kind][name])
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        spec = ep.load()
        if isinstance(spec, PluginSpec) and spec.kind == kind:
            return spec
        log.warning("plugin.ignored", entry_point=ep.name, reason=f"not a {kind} PluginSpec")
    raise ConfigError(f"{kind}.backend: expected one of {names(kind)}, got {name!r}")


def require(module: str, plugin: str, extra: str) -> Any:
    """Import an optional driver, or fail naming the extra that installs it."""
    from controlplane.errors import MissingExtraError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(plugin, module, extra) from exc
