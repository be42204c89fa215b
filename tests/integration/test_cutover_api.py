"""Cutover and OFREP over HTTP (litestar's test client), the CLI, and the real OpenFeature SDK
with its OFREP provider against a running `controlplane serve`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from controlplane.cli import main
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from controlplane.plugins.billing.fake import FakeBilling
from controlplane.times import iso
from tests.conftest import HOUR, READ_TOKEN, T0, TOKEN, tick, token_hash

AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
T = T0 + 9 * HOUR


@pytest.fixture
async def client(
    make_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[AsyncTestClient[Any]]:
    config = make_config()
    plane = ControlPlane(config, billing=FakeBilling(), clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        c.cp = plane  # type: ignore[attr-defined]
        yield c


async def test_flag_guard_refusals_are_problems_naming_the_rule(client: Any) -> None:
    r = await client.put("/v1/flags/shadow", json={"value": False, "reason": "x"}, headers=AUTH)
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["rule"] == "shadow.off_requires"
    r = await client.put(
        "/v1/flags/bill_from", json={"value": T0 - 40 * 86400, "reason": "x"}, headers=AUTH
    )
    assert r.json()["rule"] == "bill_from.window"
    r = await client.put(
        "/v1/flags/shadow", json={"value": False, "reason": "lab", "force": True}, headers=AUTH
    )
    assert r.status_code == 200
    audit = (await client.get("/v1/flags/audit", headers=AUTH)).json()["entries"]
    assert audit[0]["forced"] is True


async def test_cutover_over_http(client: Any) -> None:
    cp: ControlPlane = client.cp
    await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
    await cp.ingest([tick("a", "o1", T + 5)], "http")
    await cp.rollup(until=T + HOUR)

    r = await client.get("/v1/cutover", headers=READ)
    assert r.status_code == 200 and r.json()["stage"] == "shadow"
    r = await client.post("/v1/cutover/plan", json={"at": T}, headers=READ)
    assert r.status_code == 403

    r = await client.post("/v1/cutover/plan", json={"at": T}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["pending_from_t"] == 1 and r.json()["problems"] == []

    r = await client.post("/v1/cutover/preflight", json={"at": T}, headers=AUTH)
    checks = {c["name"]: c["status"] for c in r.json()["checks"]}
    assert r.json()["ok"] is False and checks["parity_clean"] == "fail"  # no legacy source

    r = await client.post("/v1/cutover/execute", json={"at": T, "reason": "go"}, headers=AUTH)
    assert r.status_code == 409 and r.json()["rule"] == "cutover.preflight"
    assert (await client.get("/v1/flags", headers=READ)).json()["legacy_bill_until"] is None

    r = await client.post(
        "/v1/cutover/execute", json={"at": T, "reason": "go", "force": True}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    assert r.json()["legacy_bill_until"] == T
    assert (await cp.send()).sent == 1

    r = await client.post(
        "/v1/cutover/rollback", json={"reason": "undo", "cancel_sent": True}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    assert [row["identifier"] for row in r.json()["cancelled"]] == [f"o1:gbs:{T}:1"]
    status = (await client.get("/v1/cutover", headers=READ)).json()
    assert status["stage"] == "rolled_back"
    assert [(h["step"], h["t"]) for h in status["history"]] == [("rollback", T), ("execute", T)]
    assert status["history"][1]["forced"] is True


async def test_ofrep_single_and_bulk(client: Any) -> None:
    r = await client.post("/ofrep/v1/evaluate/flags/shadow", json={"context": {}}, headers=READ)
    assert r.status_code == 200
    assert r.json() == {
        "key": "shadow",
        "value": True,
        "reason": "STATIC",
        "variant": "true",
        "metadata": {"source": "default", "version": 0},
    }
    r = await client.post("/ofrep/v1/evaluate/flags/legacy_bill_until", json={}, headers=READ)
    assert r.json()["reason"] == "DISABLED" and "value" not in r.json()
    r = await client.post("/ofrep/v1/evaluate/flags/nope", json={}, headers=READ)
    assert r.status_code == 404 and r.json()["errorCode"] == "FLAG_NOT_FOUND"
    r = await client.post("/ofrep/v1/evaluate/flags/shadow", json={"context": 3}, headers=READ)
    assert r.status_code == 400 and r.json()["errorCode"] == "INVALID_CONTEXT"
    r = await client.post("/ofrep/v1/evaluate/flags/shadow", json={})
    assert r.status_code == 401

    r = await client.post("/ofrep/v1/evaluate/flags", json={}, headers=READ)
    assert [f["key"] for f in r.json()["flags"]] == [
        "shadow",
        "authority",
        "bill_from",
        "legacy_bill_until",
    ]
    etag = r.headers["etag"]
    r = await client.post(
        "/ofrep/v1/evaluate/flags", json={}, headers={**READ, "If-None-Match": etag}
    )
    assert r.status_code == 304
    await client.cp.set_flags(_live(), actor="t", reason="go")
    r = await client.post(
        "/ofrep/v1/evaluate/flags", json={}, headers={**READ, "If-None-Match": etag}
    )
    assert r.status_code == 200
    values = {f["key"]: f.get("value") for f in r.json()["flags"]}
    assert values == {
        "shadow": False,
        "authority": "controlplane",
        "bill_from": T,
        "legacy_bill_until": T,
    }


def _live() -> list[Any]:
    from controlplane.flags import FlagChange

    return [
        FlagChange("authority", "controlplane"),
        FlagChange("bill_from", T),
        FlagChange("shadow", False),
    ]


# CLI ------------------------------------------------------------------------------------------


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(
        f"""
[storage]
backend = "sqlite"
path = "{tmp_path / "cli.db"}"
[billing]
backend = "fake"
[logging]
level = "error"
[[meters]]
name = "gbs"
event_type = "tick"
value = "data.mb * data.s / 1024"
[parity]
meter = "gbs"
"""
    )
    return path


def test_cli_cutover_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_write_config(tmp_path))
    t = int(time.time()) // HOUR * HOUR - 2 * HOUR
    assert main(["cutover", "status", "--config", config]) == 2  # read-only: creates nothing
    assert f"no database at {tmp_path / 'cli.db'}" in capsys.readouterr().err
    assert not (tmp_path / "cli.db").exists()
    assert main(["migrate", "--config", config]) == 0
    assert main(["cutover", "status", "--config", config]) == 0
    assert "stage: shadow" in capsys.readouterr().out
    assert main(["cutover", "plan", "--at", str(t), "--config", config]) == 0
    out = capsys.readouterr().out
    assert "change: authority legacy -> controlplane" in out and "'" not in out
    assert main(["cutover", "plan", "--at", str(t + 1), "--config", config]) == 1
    out = capsys.readouterr().out
    assert out.count("bill_from.aligned") == 1, out  # the rule, named once
    assert main(["cutover", "preflight", "--at", str(t), "--config", config]) == 1
    out = capsys.readouterr().out
    checks = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:-1]}
    assert checks["parity_clean"] == "FAIL" and checks["catalog_published"] == "N/A"
    assert main(["cutover", "execute", "--at", str(t), "--reason", "x", "--config", config]) == 2
    assert "cutover.preflight" in capsys.readouterr().err
    argv = ["cutover", "execute", "--at", str(t), "--reason", "x", "--force"]
    assert main([*argv, "--config", config]) == 0
    assert f"legacy_bill_until {iso(t)} ({t})" in capsys.readouterr().out
    assert (
        main(["cutover", "rollback", "--reason", "undo", "--cancel-sent", "--config", config]) == 0
    )
    assert main(["cutover", "status", "--config", config]) == 0
    assert "stage: rolled_back" in capsys.readouterr().out


# the real OpenFeature SDK ---------------------------------------------------------------------


def test_openfeature_sdk_reads_the_flags_from_a_running_server(tmp_path: Path) -> None:
    pytest.importorskip("openfeature", reason="pip install openfeature-sdk")
    ofrep = pytest.importorskip(
        "openfeature.contrib.provider.ofrep", reason="pip install openfeature-provider-ofrep"
    )
    from openfeature import api
    from openfeature.flag_evaluation import Reason

    from tests.e2e.processes import Server

    t = int(time.time()) // HOUR * HOUR - 2 * HOUR
    config = tmp_path / "serve.toml"
    config.write_text(
        _write_config(tmp_path).read_text()
        + f"""
[[auth.tokens]]
name = "legacy-biller"
sha256 = "{token_hash(READ_TOKEN)}"
scopes = ["read"]
[flags]
authority = "controlplane"
bill_from = {t}
"""
    )
    server = Server(config, tmp_path / "serve.log", "--no-scheduler")
    server.start()
    try:
        api.set_provider(ofrep.OFREPProvider(server.url, headers_factory=lambda: READ, timeout=5.0))
        client = api.get_client("legacy-biller")
        assert client.get_string_value("authority", "legacy") == "controlplane"
        assert client.get_boolean_value("shadow", False) is True
        details = client.get_integer_details("legacy_bill_until", -1)
        assert details.value == t and details.reason == Reason.STATIC
        assert client.get_integer_value("bill_from", -1) == t
        missing = client.get_boolean_details("no_such_flag", False)
        assert missing.value is False and missing.error_code is not None
    finally:
        api.clear_providers()
        server.stop()
