"""The seam over HTTP (`GET /v1/seam`, the OFREP flag `controlplane_billed_ranges`) and the CLI
(`controlplane seam`): the same answer, validated windows, read-only."""

from __future__ import annotations

import json
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
from tests.conftest import HOUR, READ_TOKEN, T0, tick

READ = {"Authorization": f"Bearer {READ_TOKEN}"}
RANGES = "/ofrep/v1/evaluate/flags/controlplane_billed_ranges"


@pytest.fixture
async def client(
    make_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[AsyncTestClient[Any]]:
    """Org o1 billed here for buckets T0+1h..T0+3h and T0+4h (T0+3h cancelled by a rollback
    inside the window; everything older kept)."""
    config = make_config(cutover={"cancel_window_seconds": 2 * HOUR})
    plane = ControlPlane(config, billing=FakeBilling(), clock=lambda: clock[0])
    async with AsyncTestClient(app=create_app(config, cp=plane)) as c:
        await plane.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
        await plane.cutover.execute(T0 + HOUR, actor="ops", reason="go", force=True)
        for i in range(1, 5):
            clock[0] = float(T0 + (i + 1) * HOUR + 900)
            await plane.ingest([tick(f"e{i}", "o1", T0 + i * HOUR + 5)], "http")
            await plane.rollup()
            await plane.send()
        clock[0] = float(T0 + 5 * HOUR + 3000)
        await plane.storage.cancel_rows(
            [r.id for r in await plane.ledger() if r.bucket_start == T0 + 3 * HOUR],
            plane.now(),
            "ops",
            "rolled_back",
        )
        await plane.cutover.rollback(actor="ops", reason="undo")
        c.cp = plane  # type: ignore[attr-defined]
        yield c


async def test_the_seam_answers_ranges_and_legacy_bill_until(client: Any) -> None:
    window = {"from": T0, "to": T0 + 24 * HOUR}
    r = await client.get("/v1/seam", params=window, headers=READ)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "from": T0,
        "to": T0 + 24 * HOUR,
        "bucket_seconds": HOUR,
        "authority": "legacy",
        "legacy_bill_until": None,
        "orgs": [
            {
                "org_id": "o1",
                "ranges": [
                    {"start": T0 + HOUR, "end": T0 + 3 * HOUR},
                    {"start": T0 + 4 * HOUR, "end": T0 + 5 * HOUR},
                ],
            }
        ],
    }
    r = await client.get("/v1/seam", params={**window, "org": "nobody"}, headers=READ)
    assert r.json()["orgs"] == []
    assert (await client.get("/v1/seam", params=window)).status_code == 401
    schema = (await client.get("/schema/openapi.json")).json()
    answer = schema["paths"]["/v1/seam"]["get"]["responses"]["200"]["content"]
    assert "Seam" in json.dumps(answer)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"to": T0 + HOUR}, "from"),
        ({"from": T0 + 5, "to": T0 + HOUR}, "from"),
        ({"from": T0, "to": T0 + 7}, "to"),
        ({"from": T0 + HOUR, "to": T0 + HOUR}, "to"),
    ],
)
async def test_a_bad_window_is_a_422_naming_the_field(
    client: Any, params: dict[str, int], field: str
) -> None:
    r = await client.get("/v1/seam", params=params, headers=READ)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [field]


async def test_ofrep_answers_the_ranges_per_org(client: Any) -> None:
    r = await client.post(RANGES, json={"context": {"targetingKey": "o1"}}, headers=READ)
    assert r.status_code == 200, r.text
    assert r.json()["reason"] == "TARGETING_MATCH"
    assert r.json()["value"] == {
        "org": "o1",
        "legacy_bill_until": None,
        "ranges": [
            {"start": T0 + HOUR, "end": T0 + 3 * HOUR},
            {"start": T0 + 4 * HOUR, "end": T0 + 5 * HOUR},
        ],
    }
    narrow = {"org": "o1", "from": T0 + 2 * HOUR, "to": T0 + 4 * HOUR}
    r = await client.post(RANGES, json={"context": narrow}, headers=READ)
    assert r.json()["value"]["ranges"] == [{"start": T0 + 2 * HOUR, "end": T0 + 3 * HOUR}]
    r = await client.post(RANGES, json={"context": {}}, headers=READ)
    assert r.status_code == 400 and r.json()["errorCode"] == "TARGETING_KEY_MISSING"
    r = await client.post(RANGES, json={"context": {"org": "o1", "from": 7}}, headers=READ)
    assert r.status_code == 400 and r.json()["errorCode"] == "INVALID_CONTEXT"
    assert "context.from" in r.json()["errorDetails"]
    bulk = await client.post(
        "/ofrep/v1/evaluate/flags", json={"context": {"org": "o1"}}, headers=READ
    )
    assert bulk.json()["flags"][-1]["key"] == "controlplane_billed_ranges"
    plain = await client.post("/ofrep/v1/evaluate/flags", json={}, headers=READ)
    assert "controlplane_billed_ranges" not in {f["key"] for f in plain.json()["flags"]}


def test_the_cli_reads_the_seam_and_creates_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cli.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\npath = "{tmp_path / "cli.db"}"\n')
    argv = ["seam", "--from", str(T0), "--to", str(T0 + HOUR), "--config", str(config)]
    assert main(argv) == 2  # read-only: creates nothing
    assert "no database" in capsys.readouterr().err and not (tmp_path / "cli.db").exists()
    assert main(["migrate", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["from"], answer["orgs"], answer["legacy_bill_until"]) == (T0, [], None)
    assert main(argv) == 0
    assert "the control plane bills no bucket in this window" in capsys.readouterr().out
    assert (
        main(["seam", "--from", str(T0 + 5), "--to", str(T0 + HOUR), "--config", str(config)]) == 2
    )
    assert "from" in capsys.readouterr().err
