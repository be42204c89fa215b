"""A control plane with a gauge meter on a fresh SQLite file, for the gauge tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import controlplane.config
from controlplane.core import ControlPlane
from controlplane.plugins.billing.fake import FakeBilling

HOUR = 3600
GB = 10**9
METER = "private_gb_hours"
STORAGE_METER: dict[str, Any] = {
    "name": METER,
    "event_type": "repo.snapshot",
    "aggregation": "time_weighted",
    "mode": "level",
    "value": "data.bytes / 1000000000",
    "series": "data.repo",
    "where": "data.visibility == 'private'",
    "event_modes": {"repo.put": "delta", "repo.visibility": "state", "repo.deleted": "state"},
    "end": "data.deleted == 1",
    "time_unit_seconds": HOUR,
}


def at(text: str) -> int:
    """Unix seconds of a UTC time written `2026-06-01T07:00`."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp())


def plane(tmp_path: Path, clock: list[int], **meter: Any) -> ControlPlane:
    config = controlplane.config.parse(
        {
            "storage": {"backend": "sqlite", "path": str(tmp_path / "cp.db")},
            "rollup": {"bucket_seconds": HOUR, "grace_seconds": 0},
            "meters": [{**STORAGE_METER, **meter}],
        }
    )
    return ControlPlane(config, billing=FakeBilling(), clock=lambda: clock[0])


def ev(ident: str, kind: str, when: int, org: str = "org-1", **data: Any) -> dict[str, Any]:
    """A usage event of type `repo.<kind>` at unix second `when`."""
    return {
        "id": ident,
        "type": f"repo.{kind}",
        "subject": org,
        "ts": when * 1000,
        "data": {"repo": "r1", **data},
    }
