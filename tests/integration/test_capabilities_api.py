"""Capability tokens over HTTP: issued for an org's plan now (admin), verified offline with
the published keys; the audit trail keeps a digest, never the token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from litestar.testing import AsyncTestClient

from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from tests.conftest import READ_TOKEN, TOKEN, tick

AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
KEY = Ed25519PrivateKey.generate()
PEM = KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


@pytest.fixture
async def client(
    make_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[AsyncTestClient[Any]]:
    config = make_config(
        capabilities={
            "keys": [{"kid": "k1", "private_key": PEM}],
            "lifetime_seconds": 600,
            "required_for": ["sandbox.create"],
        },
        plans=[
            {"name": "free", "billable": False},
            {"name": "pro", "billable": True, "entitlements": {"sandboxes": 10, "gpu": True}},
        ],
    )
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        c.plane = plane  # type: ignore[attr-defined]
        yield c


async def test_a_token_for_the_orgs_plan_verifies_offline(client: Any, clock: list[float]) -> None:
    await client.put("/v1/orgs/acme", json={"plan": "pro", "effective_from": 0}, headers=AUTH)
    r = await client.post("/v1/orgs/acme/capabilities", headers=AUTH)
    assert r.status_code == 200, r.text
    issued = r.json()
    assert (issued["org"], issued["plan"], issued["kid"]) == ("acme", "pro", "k1")
    assert issued["expires_at"] == int(clock[0]) + 600

    jwks = (await client.get("/.well-known/jwks.json")).json()  # no token needed
    (jwk,) = jwks["keys"]
    key = jwt.PyJWK.from_dict(jwk).key
    claims = jwt.decode(
        issued["token"],
        key,
        algorithms=["EdDSA"],
        audience="controlplane",
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert (claims["sub"], claims["plan"], claims["ent"]) == (
        "acme",
        "pro",
        {"sandboxes": 10, "gpu": True},
    )

    # an org without a stored plan (and no legacy biller) is free
    free = (await client.post("/v1/orgs/globex/capabilities", headers=AUTH)).json()
    assert free["plan"] == "free"

    (record, *_) = await client.plane.audit_entries("capability.")
    assert record.subject == "globex" and record.after["digest"] == free["digest"]
    assert free["token"] not in str(record)


async def test_issuing_needs_admin(client: Any) -> None:
    r = await client.post("/v1/orgs/acme/capabilities", headers=READ)
    assert r.status_code == 403
    assert await client.plane.audit_entries("capability.") == []


async def test_without_keys_issuing_is_404(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    config = make_config()
    plane = ControlPlane(config, clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        r = await c.post("/v1/orgs/acme/capabilities", headers=AUTH)
        assert r.status_code == 404 and "[[capabilities.keys]]" in r.json()["detail"]
        assert (await c.get("/.well-known/jwks.json")).json() == {"keys": []}


def test_the_cli_issues_the_token_alone_on_stdout(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.cli import main

    monkeypatch.setenv("CP_CAPABILITY_KEY", PEM)
    config = tmp_path / "cp.toml"
    config.write_text(
        f'[storage]\nbackend = "sqlite"\npath = "{tmp_path / "cp.db"}"\n'
        '[[capabilities.keys]]\nkid = "k1"\nprivate_key = { env = "CP_CAPABILITY_KEY" }\n'
    )
    assert main(["orgs", "set", "acme", "--plan", "pro", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["capability", "issue", "acme", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    (token,) = out.split()
    claims = jwt.decode(token, KEY.public_key(), algorithms=["EdDSA"], audience="controlplane")
    assert (claims["sub"], claims["plan"]) == ("acme", "pro")
    assert "plan pro, key k1" in err and token not in err

    config.write_text(f'[storage]\nbackend = "sqlite"\npath = "{tmp_path / "cp.db"}"\n')
    assert main(["capability", "issue", "acme", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: capability tokens are not configured: no [[capabilities.keys]]"
    ]


def _forged(token: str) -> str:
    """The token with one character of its signature changed."""
    head, _, signature = token.rpartition(".")
    middle = len(signature) // 2
    swapped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{signature[:middle]}{swapped}{signature[middle + 1 :]}"


def sandbox(event_id: str, org: str, at: float, token: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": event_id,
        "type": "sandbox.create",
        "subject": org,
        "ts": int(at) * 1000,
        "data": {},
    }
    if token is not None:
        event["captoken"] = token
    return event


async def test_ingest_verifies_an_events_token_and_refuses_a_bad_one_storing_nothing(
    client: Any, clock: list[float]
) -> None:
    await client.put("/v1/orgs/acme", json={"plan": "pro", "effective_from": 0}, headers=AUTH)
    token = (await client.post("/v1/orgs/acme/capabilities", headers=AUTH)).json()["token"]
    r = await client.post("/v1/events", json=sandbox("e1", "acme", clock[0], token), headers=AUTH)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text

    for event, why in [
        (sandbox("e2", "globex", clock[0], token), "issued for another org"),
        (sandbox("e3", "acme", clock[0] + 3600, token), "expired"),
        (sandbox("e4", "acme", clock[0], _forged(token)), "signature does not verify"),
        (sandbox("e5", "acme", clock[0], "not.a.token"), "malformed"),
    ]:
        batch = [sandbox("ok", "acme", clock[0], token), event]  # one bad event: none stored
        r = await client.post("/v1/events", json=batch, headers=AUTH)
        assert r.status_code == 422, r.text
        (problem,) = r.json()["errors"]
        assert (problem["index"], problem["field"]) == (1, "captoken")
        assert why in problem["message"] and token not in r.text
    since = int(clock[0] - 3600) * 1000
    assert await client.plane.storage.untokened_events(["sandbox.create"], since) == 0


async def test_required_types_need_a_token_once_the_control_plane_is_the_authority(
    client: Any, clock: list[float]
) -> None:
    from controlplane.flags import FlagChange

    plane = client.plane
    r = await client.post("/v1/events", json=sandbox("s1", "acme", clock[0]), headers=AUTH)
    assert r.status_code == 200  # legacy is the authority: accepted, counted as would-refuse
    report = await plane.cutover.preflight(int(clock[0]) // 3600 * 3600)
    (check,) = [c for c in report.checks if c.name == "capability_tokens_carried"]
    assert check.status == "fail" and "1 events of sandbox.create" in check.detail

    change = [FlagChange("authority", "controlplane")]
    await plane.set_flags(change, actor="t", reason="r", force=True)
    r = await client.post("/v1/events", json=sandbox("s2", "acme", clock[0]), headers=AUTH)
    assert r.status_code == 422
    (problem,) = r.json()["errors"]
    assert problem["field"] == "captoken" and "[capabilities] required_for" in problem["message"]
    metrics = (await client.get("/metrics")).text
    assert (
        'controlplane_events_untokened_total{outcome="would_refuse",type="sandbox.create"} 1.0'
        in metrics
    )
    assert (
        'controlplane_events_untokened_total{outcome="refused",type="sandbox.create"} 1.0'
        in metrics
    )
    # other types never need one
    ok = await client.post(
        "/v1/events",
        json=[{**sandbox("t1", "acme", clock[0]), "type": "tick", "data": {"mb": 1, "s": 1}}],
        headers=AUTH,
    )
    assert ok.status_code == 200, ok.text


async def test_the_plan_authority_chain_prices_a_bucket_by_its_newest_token_first(
    client: Any, clock: list[float]
) -> None:
    """A token's plan outranks the plan stored here, which outranks the default; each row
    says which link priced it (`plan_source`)."""
    plane = client.plane
    await client.put("/v1/orgs/acme", json={"plan": "pro", "effective_from": 0}, headers=AUTH)
    token = (await client.post("/v1/orgs/acme/capabilities", headers=AUTH)).json()["token"]
    await client.put("/v1/orgs/acme", json={"plan": "free", "effective_from": 0}, headers=AUTH)
    await client.put("/v1/orgs/initech", json={"plan": "pro", "effective_from": 0}, headers=AUTH)
    at = int(clock[0])
    events = [
        {**tick("a1", "acme", at), "captoken": token},  # stored free, token pro
        tick("g1", "globex", at),  # nothing stored: the default, free
        tick("i1", "initech", at),  # stored pro
    ]
    r = await client.post("/v1/events", json=events, headers=AUTH)
    assert r.status_code == 200, r.text
    await plane.rollup(until=at - at % 3600 + 3600)
    rows = (await client.get("/v1/ledger", headers=AUTH)).json()["rows"]
    assert {(row["org_id"], row["state"], row["plan_source"]) for row in rows} == {
        ("acme", "pending", "token"),
        ("globex", "excluded", "default"),
        ("initech", "pending", "stored"),
    }
