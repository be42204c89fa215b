"""A file backfill of events that also came in live stores each once (issue: cross-source
duplicates): events that name no source are stored under the same default source over HTTP
and from a file, and the backfill says which."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from controlplane import config as config_mod
from controlplane.cli import main
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from tests.conftest import T0, TOKEN, tick, token_hash


def test_events_backfilled_after_they_came_in_live_are_duplicates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("controlplane.logs.configure", lambda config: None)
    db = tmp_path / "cp.db"
    path = tmp_path / "cp.toml"
    path.write_text(
        f"""
[storage]
backend = "sqlite"
path = "{db}"
[auth]
tokens = [{{name = "t", sha256 = "{token_hash(TOKEN)}", scopes = ["ingest"]}}]
[logging]
level = "error"
[[meters]]
name = "gbs"
event_type = "tick"
value = "data.mb * data.s / 1024"
"""
    )
    events: list[dict[str, Any]] = [tick(f"e{i}", "acme", T0 + i) for i in range(3)]
    config = config_mod.load(path)

    async def live() -> Any:
        async with AsyncTestClient(app=create_app(config, cp=ControlPlane(config))) as client:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            return (await client.post("/v1/events", json=events, headers=auth)).json()

    assert asyncio.run(live()) == {"accepted": 3, "duplicates": 0}

    backfill = tmp_path / "backfill.ndjson"
    backfill.write_text("".join(json.dumps(e) + "\n" for e in [*events, tick("e9", "acme", T0)]))
    assert main(["ingest", str(backfill), "--dry-run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "events that name no source would be stored under source 'http' (as over HTTP)" in out
    assert "duplicates are by (source, id)" in out
    assert "a dry run reads no stored events" in out and "would accept 4" in out
    assert main(["ingest", str(backfill), "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "accepted 1, duplicates 3" in out and "were stored under source 'http'" in out
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (4,)
