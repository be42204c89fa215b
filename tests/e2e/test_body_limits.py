"""Body size limits on a live server, for bodies streamed without Content-Length (chunked):
the limit is enforced on the bytes received, not on what the client announces."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOKEN
from tests.e2e.processes import Server, base_config, bearer

pytestmark = pytest.mark.e2e
SMALL = 4096
LARGE = 65536


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    config = tmp_path / "cp.toml"
    config.write_text(
        f"[server]\nmax_small_body_bytes = {SMALL}\nmax_body_bytes = {LARGE}\n"
        + base_config(tmp_path / "cp.db")
        + '\n[stripe]\nwebhook_secret = "whsec_limits"\n'
    )
    server = Server(config, tmp_path / "server.log", "--no-scheduler")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 1024):
        yield body[i : i + 1024]


async def test_streamed_bodies_over_the_limit_are_refused(server: Server) -> None:
    headers = {**bearer(TOKEN), "Content-Type": "application/json"}
    small_over = json.dumps({"value": False, "reason": "x" * SMALL}).encode()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for method, path in (
            ("PUT", "/v1/flags/shadow"),
            ("POST", "/webhooks/stripe"),
            ("POST", "/ofrep/v1/evaluate/flags"),
        ):
            r = await client.request(method, path, content=chunked(small_over), headers=headers)
            assert r.status_code == 413, (path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        flags = (await client.get("/v1/flags", headers=headers)).json()["flags"]
        assert flags["shadow"]["source"] == "default"

        events = [
            {
                "id": str(i),
                "type": "tick",
                "subject": "acme",
                "ts": 1767225600000,
                "data": {"mb": 1, "s": 1},
            }
            for i in range(100)
        ]
        under = json.dumps(events).encode()
        assert SMALL < len(under) < LARGE  # over the small limit, inside ingest's own
        r = await client.post("/v1/events", content=chunked(under), headers=headers)
        assert r.status_code == 200 and r.json()["accepted"] == 100, r.text
        over = json.dumps(events * 20).encode()
        r = await client.post("/v1/events", content=chunked(over), headers=headers)
        assert r.status_code == 413, r.text
