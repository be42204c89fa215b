"""Fixtures of the integration tests that run once per storage backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.plugins.billing.fake import FakeBilling


@pytest.fixture(params=["sqlite", "postgres"])
def build_on_each_backend(
    request: pytest.FixtureRequest,
    make_config: Callable[..., Config],
    clock: list[float],
    fake_billing: FakeBilling,
) -> Callable[..., ControlPlane]:
    """ControlPlanes on one store of the parametrised backend (each call: a restart)."""
    sections: dict[str, Any] = {}
    if request.param == "postgres":
        from tests.harness import fresh_database

        dsn = fresh_database(request.getfixturevalue("postgres_dsn"))
        sections["storage"] = {"backend": "postgres", "dsn": dsn}

    def make(**more: Any) -> ControlPlane:
        return ControlPlane(
            make_config(**sections, **more), billing=fake_billing, clock=lambda: clock[0]
        )

    return make
