"""API hardening: the per-token ingest rate limit, body size limits on every endpoint that reads
a body, strict JSON bodies, and error answers that match the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane.config import Config, TokenConfig
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from tests.conftest import READ_TOKEN, T0, TOKEN, tick, token_hash
from tests.integration.test_api import stored

AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
BULK = "cp_test_bulk"
SMALL = 2000


@pytest.fixture
async def client(
    make_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[AsyncTestClient[Any]]:
    config = make_config(
        server={"max_body_bytes": 100_000, "max_small_body_bytes": SMALL},
        rate_limit={"events_per_second": 0.01, "burst_events": 3},
        stripe={"webhook_secret": "whsec_test"},
    )
    bulk = TokenConfig(
        name="bulk", sha256=token_hash(BULK), scopes=["ingest"], events_per_second=0
    )  # its own limit: none
    tokens = [*config.auth.tokens, bulk]
    config = msgspec.structs.replace(
        config, auth=msgspec.structs.replace(config.auth, tokens=tokens)
    )
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        c.db = config.storage.path  # type: ignore[attr-defined]
        yield c


# rate limit ---------------------------------------------------------------------------------


async def test_ingest_over_the_token_limit_is_refused_with_retry_after(client: Any) -> None:
    batch = [tick(str(i), "acme", T0) for i in range(5)]  # above the burst of 3: admitted
    assert (await client.post("/v1/events", json=batch, headers=AUTH)).status_code == 200
    with capture_logs() as logs:
        r = await client.post("/v1/events", json=tick("late", "acme", T0), headers=AUTH)
    assert r.status_code == 429
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["retry-after"] == "300"  # 3 events owed at 0.01/s: 300 s to one event
    assert r.json()["status"] == 429 and "tester" in r.json()["detail"]
    (refused,) = [e for e in logs if e["event"] == "ratelimit.refused"]
    assert refused["token"] == "tester" and refused["retry_after"] == "300"
    assert stored(client) == 5  # the refused event was not stored
    bulk = {"Authorization": f"Bearer {BULK}"}
    many = [tick(f"b{i}", "acme", T0) for i in range(50)]
    for _ in range(3):  # a token with events_per_second = 0 has no limit
        assert (await client.post("/v1/events", json=many, headers=bulk)).status_code == 200


async def test_unauthenticated_ingest_gets_401_not_429(client: Any) -> None:
    await client.post("/v1/events", json=[tick(str(i), "a", T0) for i in range(5)], headers=AUTH)
    assert (await client.post("/v1/events", json=tick("x", "a", T0))).status_code == 401


# body size limits ---------------------------------------------------------------------------

PADDING = "x" * (SMALL + 100)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/flags/shadow", {"value": False, "reason": PADDING}),
        ("PUT", "/v1/orgs/acme", {"plan": "pro", "reason": PADDING}),
        ("POST", "/v1/cutover/plan", {"at": T0, "pad": PADDING}),
        ("POST", "/v1/cutover/preflight", {"at": T0, "pad": PADDING}),
        ("POST", "/v1/cutover/execute", {"reason": PADDING}),
        ("POST", "/v1/cutover/rollback", {"reason": PADDING}),
        ("POST", "/ofrep/v1/evaluate/flags/shadow", {"context": {"pad": PADDING}}),
        ("POST", "/ofrep/v1/evaluate/flags", {"context": {"pad": PADDING}}),
        ("POST", "/webhooks/stripe", {"id": "evt_1", "pad": PADDING}),
    ],
)
async def test_every_small_body_endpoint_refuses_an_oversized_body(
    client: Any, method: str, path: str, body: dict[str, Any]
) -> None:
    """(Bodies streamed without Content-Length: tests/e2e/test_body_limits.py.)"""
    assert len(json.dumps(body)) > SMALL
    headers = {**AUTH, "Stripe-Signature": "t=1,v1=00"}
    r = await client.request(method, path, json=body, headers=headers)
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    flags = (await client.get("/v1/flags", headers=READ)).json()["flags"]
    assert flags["shadow"]["source"] == "default"  # nothing changed
    assert (await client.get("/v1/orgs/acme", headers=READ)).status_code == 404


async def test_ingest_takes_bodies_up_to_its_own_larger_limit(client: Any) -> None:
    bulk = {"Authorization": f"Bearer {BULK}", "Content-Type": "application/x-ndjson"}
    lines = "\n".join(
        f'{{"id": "{i}", "type": "tick", "subject": "acme", "ts": {T0 * 1000}, '
        f'"data": {{"mb": 1, "s": 1}}}}'
        for i in range(200)
    ).encode()
    assert SMALL < len(lines) < 100_000
    r = await client.post("/v1/events", content=lines, headers=bulk)
    assert r.status_code == 200 and r.json()["accepted"] == 200
    too_big = lines + b"\n" + b" " * 100_000
    r = await client.post("/v1/events", content=too_big, headers=bulk)
    assert r.status_code == 413


# strict bodies and error answers ------------------------------------------------------------


async def test_bodies_are_decoded_strictly_and_name_the_bad_field(client: Any) -> None:
    r = await client.post(
        "/v1/cutover/rollback", json={"reason": "x", "cancel_sent": 0}, headers=AUTH
    )
    assert r.status_code == 400
    assert [(e["field"], e["in"]) for e in r.json()["errors"]] == [("cancel_sent", "body")]
    r = await client.put(
        "/v1/flags/shadow", json={"value": True, "reason": "x", "why": 1}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "why"
    r = await client.put("/v1/flags/shadow", json={"value": True, "reason": "  "}, headers=AUTH)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "reason"
    r = await client.put(
        "/v1/orgs/acme", json={"plan": "pro", "effective_from": 1e20}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "effective_from"
    r = await client.post("/v1/cutover/plan", json={"at": float(T0)}, headers=AUTH)
    assert r.status_code == 200, r.text  # 1767225600.0 is an integer, as in JSON Schema
    r = await client.post("/v1/cutover/plan", content=b"{", headers=AUTH)
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]


async def test_query_errors_name_the_parameter_as_sent(client: Any) -> None:
    r = await client.get("/v1/usage", params={"to": "soon"}, headers=READ)
    assert r.status_code == 400
    assert [(e["field"], e["in"]) for e in r.json()["errors"]] == [("to", "query")]
    r = await client.get("/v1/ledger", params={"from": 10**15}, headers=READ)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "from"
    r = await client.get("/internal/usage-parity", params={"to": T0}, headers=AUTH)
    assert r.status_code == 400 and r.json()["errors"] == [
        {"field": "from", "message": "required", "in": "query"}
    ]


async def test_wrong_method_answers_405_with_allow(client: Any) -> None:
    r = await client.delete("/v1/flags", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "GET, OPTIONS"
    r = await client.options("/v1/orgs/acme")
    assert r.status_code == 204 and r.headers["allow"] == "GET, OPTIONS, PUT"


async def test_openapi_documents_problems_limits_and_bodies(client: Any) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    ingest = schema["paths"]["/v1/events"]["post"]
    assert set(ingest["responses"]) >= {"200", "401", "403", "413", "422", "429", "503"}
    problem = ingest["responses"]["429"]["content"]["application/problem+json"]["schema"]
    assert problem == {"$ref": "#/components/schemas/ProblemDetails"}
    body = ingest["requestBody"]["content"]
    assert set(body) == {
        "application/json",
        "application/cloudevents-batch+json",
        "application/x-ndjson",
    }
    for flag in ("authority", "bill_from", "shadow"):  # each flag's body says its value type
        put_flag = schema["paths"][f"/v1/flags/{flag}"]["put"]
        assert put_flag["security"] == [{"bearer": []}]
    shadow = schema["components"]["schemas"]["ShadowPut"]
    assert shadow["additionalProperties"] is False and shadow["required"] == ["value", "reason"]
    assert shadow["properties"]["value"] == {"type": "boolean"}
    assert shadow["properties"]["reason"]["pattern"] == "\\S"
    window = schema["paths"]["/internal/usage-parity"]["get"]["parameters"][0]
    assert (window["name"], window["required"], window["schema"]["multipleOf"]) == (
        "from",
        True,
        3600,
    )
    assert "/metrics" in schema["paths"]


async def test_numbers_beyond_what_storage_holds_are_refused_not_500(client: Any) -> None:
    """Found by probing the fuzzed endpoints with huge integers: each used to be a 500 (an
    OverflowError converting to a 64-bit SQLite integer, or a decimal InvalidOperation)."""
    bulk = {"Authorization": f"Bearer {BULK}"}
    far = {**tick("far", "acme", T0), "ts": 10**25}
    huge = tick("huge", "acme", T0, mb=10**300, s=10**300)
    big = tick("big", "acme", T0, mb=10**13 * 1024, s=1)  # 1e13 units: over 2^63 micro-units
    r = await client.post("/v1/events", json=[far, huge, big], headers=bulk)
    assert r.status_code == 422, r.text
    assert [(e["index"], e["field"]) for e in r.json()["errors"]] == [
        (0, "ts"),
        (1, "data"),
        (2, "data"),
    ]
    assert "out of range" in r.json()["errors"][1]["message"]
    assert stored(client) == 0
    r = await client.put(
        "/v1/flags/bill_from",
        json={"value": 3600 * 10**22, "reason": "far", "force": True},
        headers=AUTH,
    )
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "value"
    r = await client.get("/v1/catalog", params={"version": 10**30}, headers=READ)
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "version"
    assert (await client.get(f"/v1/parity/runs/{10**30}", headers=READ)).status_code == 400
