"""No input is a 500, and a large body costs a bounded amount of memory (issue: bad input is
never a 500 or an endless retry): undecodable headers, huge numbers in headers, JSON nested
past 64 levels on every endpoint that reads a body, ingest bodies that are no JSON, oversize
batches refused before they are decoded, Content-Encoding, config expressions nested
thousands of levels deep, and the catch-all behind them."""

from __future__ import annotations

import asyncio
import gzip
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane import config as config_mod
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import ConfigError
from controlplane.http.app import create_app
from controlplane.http.problems import on_error
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
    r = await client.get("/healthz", headers=[(b"x-request-id", "caf\xe9".encode("latin-1"))])
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


BODIES = [
    ("POST", "/v1/events", "application/json"),
    ("POST", "/v1/events", "application/x-ndjson"),
    ("PUT", "/v1/flags/shadow", "application/json"),
    ("PUT", "/v1/orgs/acme", "application/json"),
    ("POST", "/v1/cutover/plan", "application/json"),
    ("POST", "/v1/cutover/execute", "application/json"),
]


def event_nested(depth: int) -> bytes:
    """An event whose JSON nests `depth` levels (the event's own object is the first)."""
    inner = b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1)
    return json.dumps(tick("deep", "acme", T0)).encode()[:-1] + b',"more":' + inner + b"}"


@pytest.mark.parametrize(("method", "path", "media"), BODIES)
@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT, event_nested(65)], ids=["[", "{", "65"])
async def test_json_nested_past_the_limit_is_a_400_naming_why(
    client: AsyncTestClient[Any], method: str, path: str, media: str, body: bytes
) -> None:
    """Before, a thousand levels was an unhandled RecursionError (a 500, or a 422 on ingest),
    and 950 levels were stored, to fail wherever they were decoded again."""
    with capture_logs() as logs:
        r = await client.request(
            method, path, content=body, headers={**AUTH, "content-type": media}
        )
    assert r.status_code == 400, (path, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "JSON nested deeper than 64 levels" in r.json()["detail"]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


async def test_json_nested_to_the_limit_is_stored(client: AsyncTestClient[Any]) -> None:
    r = await client.post("/v1/events", content=event_nested(64), headers=AUTH)
    assert r.json() == {"accepted": 1, "duplicates": 0}, r.text


@pytest.mark.parametrize("path", ["/ofrep/v1/evaluate/flags", "/ofrep/v1/evaluate/flags/shadow"])
async def test_ofrep_bodies_nested_past_the_limit_are_a_parse_error(
    client: AsyncTestClient[Any], path: str
) -> None:
    for body in (DEEP_OBJECT, b'{"context":' + DEEP_OBJECT + b"}"):
        r = await client.post(path, content=body, headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["errorCode"] == "PARSE_ERROR"
        assert "nested deeper than 64 levels" in r.json()["errorDetails"]


@pytest.mark.parametrize(
    ("body", "media", "why"),
    [
        (b"\xff\xfe not JSON", "application/json", "malformed JSON"),
        (b'{"id": "\xc3\x28"}', "application/json", "malformed JSON"),
        (b'{"id": "a"}\n\xff\n', "application/x-ndjson", "line 2"),
        (b"[{}]]", "application/json", "a bracket closes none opened"),
    ],
)
async def test_an_ingest_body_that_is_no_json_is_a_400(
    client: AsyncTestClient[Any], body: bytes, media: str, why: str
) -> None:
    """Undecodable bodies answer 400, as every other endpoint does (ingest said 422: the
    status of well-formed input the rules refuse)."""
    r = await client.post("/v1/events", content=body, headers={**AUTH, "content-type": media})
    assert r.status_code == 400, r.text
    assert why in r.json()["detail"]


@pytest.mark.parametrize(
    ("length", "status"), [("9" * 5000, 413), ("9" * 19, 413), ("\xb2", 400), ("-1", 400)]
)
async def test_a_content_length_of_thousands_of_digits_or_none_is_a_4xx(
    client: AsyncTestClient[Any], length: str, status: int
) -> None:
    """uvicorn refuses these itself; the app must not rely on it (int() of 5,000 digits
    raises, and "\xb2" (superscript two) passes str.isdigit())."""
    headers = [
        (b"authorization", AUTH["Authorization"].encode()),
        (b"content-length", length.encode("latin-1")),
    ]
    with capture_logs() as logs:
        r = await client.post("/v1/events", content=b"{}", headers=headers)
    assert r.status_code == status, r.text
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


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


def oversize_bodies(limit: int) -> list[tuple[str, bytes, str]]:
    """Bodies of at most `limit` bytes that decoded whole take 5 to 30 times their size: too
    many events (empty, one holding a string, valid ones), one event holding millions of
    values, NDJSON lines."""

    def fill(unit: bytes, room: int, sep: bytes = b",") -> bytes:
        return sep.join([unit] * (room // (len(unit) + len(sep))))

    head = json.dumps(tick("big", "acme", T0)).encode()[:-1] + b',"more":['
    bodies = [
        ("{}", b"[" + fill(b"{}", limit - 2) + b"]", "application/json"),
        ("{} and a string", b"[" + fill(b"{}", limit - 20) + b',{"a":"b"}]', "application/json"),
        ("events", b"[" + fill(b'{"id":"1","type":"t","subject":"o"}', limit) + b"]", JSON),
        ("{} in one event", head + fill(b"{}", limit - len(head) - 2) + b"]}", JSON),
        ("1.0 in one event", head + fill(b"1.0", limit - len(head) - 2) + b"]}", JSON),
        ("NDJSON", fill(b"{}", limit, b"\n"), "application/x-ndjson"),
    ]
    assert all(len(body) <= limit for _, body, _ in bodies)
    return bodies


JSON = "application/json"


async def test_concurrent_oversize_batches_are_refused_in_bounded_memory(
    make_config: Callable[..., Config],
) -> None:
    """Concurrent 10 MiB bodies of millions of tiny values, at the top level or inside one
    event: each is refused with 413 before it is decoded. Before, each became millions of
    objects (about 250 MB each), or, inside one event, was decoded and stored."""
    config = make_config()
    limit = config.server.max_body_bytes
    bodies = oversize_bodies(limit)
    async with AsyncTestClient(app=create_app(config, cp=ControlPlane(config))) as client:

        async def post(body: bytes, media: str) -> tuple[int, str]:
            headers = {**AUTH, "content-type": media}
            r = await client.post("/v1/events", content=body, headers=headers)
            return r.status_code, r.json()["detail"]

        for name, body, media in bodies:  # one at a time: the bound per request
            tracemalloc.start()
            try:
                status, detail = await post(body, media)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert status == 413, (name, detail)
            assert "events: at most 10000 per batch" in detail or "JSON values" in detail
            # the request's copy of the body and the scan's: measured 2 to 3 times the
            # body; decoded whole, these bodies took 20 to 30 times
            assert peak < 4 * len(body), f"{name}: {peak / len(body):.1f} times the body"
        tracemalloc.start()
        try:
            answers = await asyncio.gather(*(post(body, media) for _, body, media in bodies))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [status for status, _ in answers] == [413] * len(bodies)
    total = sum(len(body) for _, body, _ in bodies)  # measured: half of it
    assert peak < 2 * total, f"peak {peak / 2**20:.0f} MiB for {total / 2**20:.0f} MiB of bodies"


def test_an_expression_nested_thousands_of_levels_is_a_config_error(tmp_path: Any) -> None:
    raw = raw_config(tmp_path / "cp.db")
    raw["meters"][0]["value"] = "-" * 5000 + "data.mb"
    with pytest.raises(ConfigError, match=r"meters\[0\] \(gbs\).*nested too deeply"):
        config_mod.parse(raw)
    raw["meters"][0]["value"] = "-" * 40 + "data.mb"
    with pytest.raises(ConfigError, match=r"nested \d+ levels deep; at most 32"):
        config_mod.parse(raw)


@pytest.mark.parametrize(
    "exc",
    [
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        RecursionError("maximum recursion depth exceeded"),
    ],
)
def test_input_a_handler_cannot_decode_is_a_400_wherever_it_is_found(exc: Exception) -> None:
    """The catch-all: undecodable input that reaches past every check is still a 400, not a
    500 logged with a traceback."""
    with capture_logs() as logs:
        r = on_error(None, exc)  # type: ignore[arg-type]  # only validation errors read it
    assert r.status_code == 400 and r.media_type == "application/problem+json"
    assert logs == []
    with capture_logs() as logs:
        assert on_error(None, KeyError("a bug")).status_code == 500  # type: ignore[arg-type]
    assert [e["event"] for e in logs] == ["api.unexpected"]
