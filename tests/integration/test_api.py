"""The HTTP API through litestar's test client, on a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from tests.conftest import HOUR, READ_TOKEN, T0, TOKEN, tick

AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.fixture
async def client(
    make_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[AsyncTestClient[Any]]:
    config = make_config(server={"max_body_bytes": 200_000, "max_batch_events": 50})
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        c.db = config.storage.path  # type: ignore[attr-defined]
        yield c


def stored(client: Any) -> int:
    with sqlite3.connect(client.db) as conn:
        return int(conn.execute("SELECT count(*) FROM usage_events").fetchone()[0])


async def test_ingest_json_object_array_ndjson_and_cloudevents_batch(client: Any) -> None:
    one = tick("a", "acme", T0)
    r = await client.post("/v1/events", json=one, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}
    r = await client.post(
        "/v1/events", json=[tick("b", "acme", T0), tick("c", "acme", T0)], headers=AUTH
    )
    assert r.json() == {"accepted": 2, "duplicates": 0}
    nd = "\n".join(json.dumps(tick(i, "acme", T0)) for i in ("d", "e")) + "\n"
    r = await client.post(
        "/v1/events", content=nd, headers={**AUTH, "Content-Type": "application/x-ndjson"}
    )
    assert r.json() == {"accepted": 2, "duplicates": 0}
    r = await client.post(
        "/v1/events",
        content=json.dumps([{**tick("f", "acme", T0), "specversion": "1.0"}]),
        headers={**AUTH, "Content-Type": "application/cloudevents-batch+json"},
    )
    assert r.json() == {"accepted": 1, "duplicates": 0}
    assert stored(client) == 6
    for media in ("text/plain", "application/xml", "multipart/form-data; boundary=x"):
        r = await client.post(
            "/v1/events", content=json.dumps(one), headers={**AUTH, "Content-Type": media}
        )
        assert r.status_code == 415 and "unsupported content type" in r.json()["detail"], r.text
    assert stored(client) == 6


async def test_duplicates_are_counted_never_stored_twice(client: Any) -> None:
    batch = [tick(str(i), "acme", T0 + i) for i in range(10)]
    assert (await client.post("/v1/events", json=batch, headers=AUTH)).json() == {
        "accepted": 10,
        "duplicates": 0,
    }
    r = await client.post("/v1/events", json=[*batch, tick("new", "acme", T0)], headers=AUTH)
    assert r.json() == {"accepted": 1, "duplicates": 10}
    other_source = [{**tick("0", "acme", T0), "source": "backfill"}]
    assert (await client.post("/v1/events", json=other_source, headers=AUTH)).json()[
        "accepted"
    ] == 1
    assert stored(client) == 12


async def test_invalid_batch_stores_nothing_and_lists_each_bad_event(client: Any) -> None:
    batch = [
        tick("ok", "acme", T0),
        {"id": "x", "type": "tick", "ts": 1},
        tick("bad", "acme", T0, mb="lots"),
    ]  # type: ignore[arg-type]
    r = await client.post("/v1/events", json=batch, headers=AUTH)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == 422 and body["title"] == "Invalid input"
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(1, "subject"), (2, "data.mb")]
    assert stored(client) == 0


async def test_auth_and_scopes(client: Any) -> None:
    r = await client.post("/v1/events", json=tick("a", "acme", T0))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert (
        await client.post(
            "/v1/events", json=tick("a", "acme", T0), headers={"Authorization": "Bearer nope"}
        )
    ).status_code == 401
    r = await client.post("/v1/events", json=tick("a", "acme", T0), headers=READ)
    assert r.status_code == 403 and "ingest" in r.json()["detail"]
    assert stored(client) == 0
    assert (await client.get("/v1/usage", headers=READ)).status_code == 200
    assert (
        await client.put("/v1/flags/shadow", json={"value": False, "reason": "x"}, headers=READ)
    ).status_code == 403


async def test_limits_answer_413(client: Any) -> None:
    too_many = [tick(str(i), "acme", T0) for i in range(51)]
    r = await client.post("/v1/events", json=too_many, headers=AUTH)
    assert r.status_code == 413 and "at most 50" in r.json()["detail"]
    big = [tick(str(i), "acme", T0, pad="x" * 5000) for i in range(45)]
    r = await client.post("/v1/events", json=big, headers=AUTH)
    assert r.status_code == 413
    assert stored(client) == 0


async def test_usage_and_ledger(client: Any, clock: list[float]) -> None:
    events = [tick(str(i), "acme", T0 + i * 20, mb=100) for i in range(180)]  # one hour
    await client.post("/v1/events", json=events[:50], headers=AUTH)
    await client.post("/v1/events", json=events[50:100], headers=AUTH)
    await client.post("/v1/events", json=events[100:150], headers=AUTH)
    await client.post("/v1/events", json=events[150:], headers=AUTH)
    r = await client.get("/v1/usage", params={"org": "acme", "meter": "gbs"}, headers=READ)
    assert r.json() == {
        "rows": [{"org_id": "acme", "meter": "gbs", "bucket_start": T0, "value": "351.5625"}]
    }

    r = await client.put(
        "/v1/orgs/acme",
        json={"customer": "cus_1", "plan": "pro", "effective_from": 0},
        headers=AUTH,
    )
    assert r.status_code == 200 and r.json()["plan"] == "pro"
    plane: ControlPlane = client.app.state.cp
    await plane.rollup()
    r = await client.get("/v1/ledger", params={"org": "acme", "state": "pending"}, headers=READ)
    (row,) = r.json()["rows"]
    assert row["identifier"] == f"acme:gbs:{T0}:1"
    assert (row["value"], row["quantity"], row["state"]) == ("351.5625", 351, "pending")
    assert row["bucket_end"] == T0 + HOUR
    assert (await client.get("/v1/ledger", params={"state": "sent"}, headers=READ)).json() == {
        "rows": []
    }
    r = await client.get("/v1/ledger", params={"state": "bogus"}, headers=READ)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")


async def test_flags_put_and_audit(client: Any) -> None:
    r = await client.get("/v1/flags", headers=READ)
    body = r.json()
    assert body["flags"]["shadow"] == {"value": True, "source": "default", "version": 0}
    assert body["legacy_bill_until"] is None

    r = await client.put(
        "/v1/flags/bill_from", json={"value": T0 + 1, "reason": "plan"}, headers=AUTH
    )
    assert r.status_code == 409 and r.json()["rule"] == "bill_from.aligned"
    r = await client.put("/v1/flags/bill_from", json={"value": T0}, headers=AUTH)
    assert r.status_code == 400 and r.json()["errors"][0]["message"].endswith("`reason`")
    r = await client.put("/v1/flags/bogus", json={"value": 1, "reason": "x"}, headers=AUTH)
    assert r.status_code == 404
    r = await client.put(
        "/v1/flags/authority", json={"value": "stripe", "reason": "x"}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "value"

    r = await client.put(
        "/v1/flags/bill_from", json={"value": T0, "reason": "cutover plan"}, headers=AUTH
    )
    assert r.status_code == 200
    r = await client.put(
        "/v1/flags/authority", json={"value": "edge", "reason": "cutover"}, headers=AUTH
    )
    body = r.json()
    assert body["flags"]["authority"] == {
        "value": "controlplane",
        "source": "runtime",
        "version": 1,
    }
    assert body["legacy_bill_until"] == T0

    entries = (await client.get("/v1/flags/audit", headers=READ)).json()["entries"]
    assert [(e["flag"], e["before"], e["after"], e["actor"], e["reason"]) for e in entries] == [
        ("authority", "legacy", "controlplane", "tester", "cutover"),
        ("bill_from", None, T0, "tester", "cutover plan"),
    ]


async def test_orgs(client: Any) -> None:
    assert (await client.get("/v1/orgs/acme", headers=READ)).status_code == 404
    r = await client.put("/v1/orgs/acme", json={}, headers=AUTH)
    assert r.status_code == 422
    await client.put("/v1/orgs/acme", json={"plan": "pro", "effective_from": 100}, headers=AUTH)
    await client.put("/v1/orgs/acme", json={"customer": "cus_9"}, headers=AUTH)
    body = (await client.get("/v1/orgs/acme", headers=READ)).json()
    assert body["customer"] == "cus_9" and body["plans"] == [{"plan": "pro", "effective_from": 100}]
    r = await client.put("/v1/orgs/acme", json={"plan": "fre"}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["errors"] == [
        {"field": "plan", "message": "unknown plan 'fre'; known plans: free, pro"}
    ]


async def test_health_readiness_and_schema(client: Any) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"storage": "ok", "migrations": "ok"}
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/v1/events" in schema["paths"] and "/v1/flags/shadow" in schema["paths"]
    r = await client.get("/healthz", headers={"X-Request-ID": "abc"})
    assert r.headers["x-request-id"] == "abc"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("shadow", "false", "Expected `bool`, got `str`"),
        ("shadow", "yes", "Expected `bool`, got `str`"),
        ("shadow", 0, "Expected `bool`, got `int`"),
        ("shadow", None, "Expected `bool`, got `null`"),
        ("bill_from", True, "Expected `int | str | null`, got `bool`"),
        ("bill_from", "tomorrow", "Expected `str` matching regex"),
        ("authority", None, "Expected `str`, got `null`"),
        ("authority", "stripe", "Invalid enum value 'stripe'"),
    ],
)
async def test_a_flag_takes_only_its_json_types(
    client: Any, name: str, value: Any, message: str
) -> None:
    """`PUT /v1/flags/shadow` took "false" and "yes" as strings, as the environment does."""
    r = await client.put(f"/v1/flags/{name}", json={"value": value, "reason": "x"}, headers=AUTH)
    assert r.status_code == 400, r.text
    (error,) = r.json()["errors"]
    assert error["field"] == "value" and error["message"].startswith(message), error
    assert (await client.get("/v1/flags", headers=READ)).json()["flags"][name]["version"] == 0


async def test_times_are_unix_seconds_or_rfc_3339_and_answered_as_unix_seconds(
    client: Any,
) -> None:
    iso = datetime.fromtimestamp(T0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = await client.put("/v1/flags/bill_from", json={"value": iso, "reason": "plan"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["flags"]["bill_from"]["value"] == T0
    r = await client.put("/v1/orgs/acme", json={"plan": "pro", "effective_from": iso}, headers=AUTH)
    assert r.status_code == 200 and r.json()["plans"] == [{"plan": "pro", "effective_from": T0}]
    r = await client.post("/v1/cutover/plan", json={"at": iso}, headers=AUTH)
    assert r.status_code == 200 and r.json()["at"] == T0
    bad = {  # not RFC 3339 by the schema: 400; spelled right but impossible: 422
        "2026-01-01T00:00:00": 400,
        "yesterday": 400,
        "2026-01-01T00:00:00.5Z": 422,
        "2026-02-30T00:00:00Z": 422,
        "2026-01-01T00:00:00+24:00": 422,
    }
    for value, status in bad.items():
        r = await client.put(
            "/v1/orgs/acme", json={"plan": "free", "effective_from": value}, headers=AUTH
        )
        assert r.status_code == status, r.text
        assert r.json()["errors"][0]["field"] == "effective_from"


async def test_events_no_meter_reads_are_counted_in_the_answer_and_the_metrics(
    client: Any,
) -> None:
    """`usage_tik` (a typo) was answered {"accepted": 1}, stored and never billed, silently."""
    typos = [{**tick(f"t{i}", "acme", T0), "type": f"tik{i % 7}"} for i in range(9)]
    r = await client.post("/v1/events", json=[tick("ok", "acme", T0), *typos], headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert (body["accepted"], body["unmetered"]) == (10, 9)
    assert body["unmetered_types"] == {"tik0": 2, "tik1": 2, "tik2": 1, "tik3": 1, "tik4": 1}
    assert stored(client) == 10  # accepted: stored, and said so
    metrics = (await client.get("/metrics")).text
    assert 'controlplane_events_unmetered_total{type="tik0"} 2.0' in metrics
    assert 'controlplane_events_unmetered_total{type="other"} 2.0' in metrics  # tik5, tik6
    assert (await client.post("/v1/events", json=tick("ok2", "acme", T0), headers=AUTH)).json() == {
        "accepted": 1,
        "duplicates": 0,
    }


async def test_events_no_meter_reads_can_be_refused(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    config = make_config(events={"unknown_types": "reject"})
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        batch = [tick("ok", "acme", T0), {**tick("typo", "acme", T0), "type": "usage_tik"}]
        r = await c.post("/v1/events", json=batch, headers=AUTH)
        assert r.status_code == 422
        (error,) = r.json()["errors"]
        assert (error["index"], error["field"]) == (1, "type")
        assert error["message"].startswith("no meter reads events of type 'usage_tik'")
        assert (await plane.usage()) == []  # nothing of the batch
