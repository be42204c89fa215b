"""Acknowledged means durable: SIGKILL the server right after a 200, and nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import T0, TOKEN
from tests.e2e.processes import Server, base_config, bearer

pytestmark = pytest.mark.e2e


def config_text(db: Path) -> str:
    return base_config(db, scopes="ingest read", synchronous="full")


def batch(n: int, size: int = 200) -> list[dict[str, object]]:
    return [
        {
            "id": f"b{n}-{i}",
            "type": "tick",
            "subject": f"org{i % 7}",
            "ts": (T0 + n * 60 + i) * 1000,
            "data": {"mb": 512, "s": 20},
        }
        for i in range(size)
    ]


async def _post_until_killed(server: Server, first: int, acked: list[int]) -> None:
    """Several clients post batches; the first 200 after a few acks triggers SIGKILL."""
    stop = asyncio.Event()
    counter = iter(range(first, first + 10_000))

    async def client() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(TOKEN), timeout=10) as c:
            while not stop.is_set():
                n = next(counter)
                try:
                    r = await c.post("/v1/events", json=batch(n))
                except httpx.HTTPError:
                    return  # the server is gone: this batch was never acknowledged
                if r.status_code == 200:
                    assert r.json() == {"accepted": 200, "duplicates": 0}
                    acked.append(n)
                    if len(acked) >= 3 and not stop.is_set():
                        stop.set()
                        server.kill()  # right after a 200, other requests still in flight

    await asyncio.gather(*(client() for _ in range(3)))


async def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "cp.db"
    config = tmp_path / "cp.toml"
    config.write_text(config_text(db))
    acked: list[int] = []
    for round_ in range(3):
        server = Server(config, tmp_path / "server.log", "--no-scheduler")
        server.start()
        try:
            await _post_until_killed(server, round_ * 1000, acked)
        finally:
            server.stop()

    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM usage_events")}
    missing = [f"b{n}-{i}" for n in acked for i in range(200) if f"b{n}-{i}" not in stored]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:3]}"

    server = Server(config, tmp_path / "server.log", "--no-scheduler")
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(TOKEN)) as c:
            for n in acked:
                r = await c.post("/v1/events", json=batch(n))
                assert r.json() == {"accepted": 0, "duplicates": 200}
            usage = (await c.get("/v1/usage", params={"meter": "gbs"})).json()["rows"]
    finally:
        server.stop()
    # each event is worth exactly 512 * 20 / 1024 = 10 GB-seconds, and each is counted once
    assert sum(Decimal(r["value"]) for r in usage) == 10 * len(stored)


def test_sigterm_closes_the_control_plane_before_the_process_exits(tmp_path: Path) -> None:
    """SIGTERM (systemd, Kubernetes) stops the server gracefully: storage is closed (SQLite
    checkpoints and removes its write-ahead log) and the exit status is 0."""
    db = tmp_path / "cp.db"
    config = tmp_path / "cp.toml"
    config.write_text(config_text(db))
    server = Server(config, tmp_path / "server.log", "--no-scheduler")
    server.start()
    try:
        answer = httpx.post(f"{server.url}/v1/events", json=batch(1), headers=bearer(TOKEN))
        assert answer.json()["accepted"] == 200
        assert Path(f"{db}-wal").exists()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0, server.output()
    finally:
        server.stop()
    assert not Path(f"{db}-wal").exists(), server.output()
