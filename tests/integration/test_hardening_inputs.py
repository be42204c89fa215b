"""No input is a 500, and a large body costs a bounded amount of memory (issue: bad input is
never a 500 or an endless retry): undecodable headers, huge numbers in headers, JSON nested a
thousand levels deep, Content-Encoding, config expressions nested thousands of levels deep."""

from __future__ import annotations

import asyncio
import gzip
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from controlplane import config as config_mod
from controlplane.app import create_app
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import ConfigError
from tests.conftest import T0, TOKEN, raw_config, tick

AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEEP = b"[" * 1000 + b"]" * 1000
DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000


@pytest.fixture
async def client(make_config: Callable[..., Config]) -> AsyncIterator[AsyncTestClient[Any]]:
    config = make_config(parity={"meter": "gbs", "hmac_secret": "s"})
    async with AsyncTestClient(app=create_app(config, cp=ControlPlane(config))) as c:
        yield c


async def test_a_request_id_that_is_not_utf8_is_replaced_not_a_500(
    client: AsyncTestClient[Any],
) -> None:
    r = await client.get("/healthz", headers=[("x-request-id", "caf\xe9".encode("latin-1"))])
    assert r.status_code == 200
    assert len(r.headers["x-request-id"]) == 32  # a new one
    r = await client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize("digits", [13, 309, 5000])
async def test_a_huge_signature_timestamp_is_a_401(
    client: AsyncTestClient[Any], digits: int
) -> None:
    r = await client.get(
        f"/internal/usage-parity?from={T0}&to={T0 + 3600}",
        headers={"X-Timestamp": "9" * digits, "X-Signature": "00"},
    )
    assert r.status_code == 401, r.text
    assert "X-Timestamp" in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/events", DEEP),
        ("POST", "/v1/events", DEEP_OBJECT),
        ("PUT", "/v1/flags/shadow", DEEP_OBJECT),
        ("PUT", "/v1/orgs/acme", DEEP),
        ("POST", "/v1/cutover/plan", DEEP_OBJECT),
    ],
)
async def test_json_nested_a_thousand_levels_is_a_4xx(
    client: AsyncTestClient[Any], method: str, path: str, body: bytes
) -> None:
    headers = {**AUTH, "content-type": "application/json"}
    r = await client.request(method, path, content=body, headers=headers)
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_gzip_bodies_are_decoded_and_other_encodings_refused(
    client: AsyncTestClient[Any],
) -> None:
    body = json.dumps([tick("g1", "acme", T0), tick("g2", "acme", T0)]).encode()
    zipped = {**AUTH, "content-type": "application/json", "content-encoding": "gzip"}
    r = await client.post("/v1/events", content=gzip.compress(body), headers=zipped)
    assert r.json() == {"accepted": 2, "duplicates": 0}, r.text
    r = await client.post("/v1/events", content=body, headers=zipped)  # says gzip, is not
    assert r.status_code == 400 and "gzip" in r.json()["detail"]
    r = await client.post("/v1/events", content=body, headers={**zipped, "content-encoding": "br"})
    assert r.status_code == 415
    # a small gzip that inflates past the body limit (10 MiB) is refused, not inflated
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))
    assert len(bomb) < 1024 * 1024
    r = await client.post("/v1/events", content=bomb, headers=zipped)
    assert r.status_code == 413


async def test_concurrent_oversize_batches_are_refused_in_bounded_memory(
    make_config: Callable[..., Config],
) -> None:
    """Eight concurrent 10 MiB bodies of 3.5 million `{}` (or of small objects): each is
    refused with 413 before it is decoded whole. Before, each became millions of objects."""
    config = make_config()
    limit = config.server.max_body_bytes
    tiny = b"[" + b",".join([b"{}"] * ((limit - 2) // 3)) + b"]"
    small = b"[" + b",".join([b'{"a":1}'] * ((limit - 2) // 8)) + b"]"
    ndjson = b"{}\n" * (limit // 3)
    assert max(len(tiny), len(small), len(ndjson)) <= limit
    async with AsyncTestClient(app=create_app(config, cp=ControlPlane(config))) as client:

        async def post(body: bytes, media: str) -> int:
            headers = {**AUTH, "content-type": media}
            return (await client.post("/v1/events", content=body, headers=headers)).status_code

        bodies = [(tiny, "application/json"), (small, "application/json")] * 3
        bodies += [(ndjson, "application/x-ndjson")] * 2
        tracemalloc.start()
        try:
            statuses = await asyncio.gather(*(post(b, m) for b, m in bodies))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert statuses == [413] * len(bodies)
    # At most twice the bodies themselves (measured: 60 MiB for the eight); decoded whole
    # they took about 250 MB each.
    assert peak < 2 * len(bodies) * limit, f"peak {peak / 2**20:.0f} MiB"


def test_an_expression_nested_thousands_of_levels_is_a_config_error(tmp_path: Any) -> None:
    raw = raw_config(tmp_path / "cp.db")
    raw["meters"][0]["value"] = "-" * 5000 + "data.mb"
    with pytest.raises(ConfigError, match=r"meters\[0\] \(gbs\).*nested too deeply"):
        config_mod.parse(raw)
    raw["meters"][0]["value"] = "-" * 40 + "data.mb"
    with pytest.raises(ConfigError, match=r"nested \d+ levels deep; at most 32"):
        config_mod.parse(raw)
