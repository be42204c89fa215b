"""Parity over HTTP and on a schedule: the endpoint (token and signature auth), the checker's
history and alerts, the CLI. SQLite storage; the legacy biller is a JSON endpoint on loopback."""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane import cli, parity
from controlplane.cli.commands.parity import parity as parity_cmd
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from tests.conftest import HOUR, READ_TOKEN, T0, TOKEN, tick
from tests.harness import HTTPRecorder, Request

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "parity-secret"
PATH = "/internal/usage-parity"


class Legacy:
    """A legacy biller's JSON endpoint: usage per bucket and org, summed over the window."""

    def __init__(self) -> None:
        self.usage: dict[int, dict[str, str]] = {}
        self.fail = False
        self.server = HTTPRecorder(self.route)

    def route(self, request: Request) -> tuple[int, Any]:
        if self.fail:
            return 500, {"error": "down"}
        query = dict(p.split("=") for p in request.path.split("?", 1)[1].split("&"))
        start, end = int(query["from"]), int(query["to"])
        rows: list[list[str]] = []
        for bucket, orgs in self.usage.items():
            if start <= bucket < end:
                rows.extend([org, value] for org, value in orgs.items())
        return 200, rows


@pytest.fixture
def legacy() -> Iterator[Legacy]:
    biller = Legacy()
    with biller.server:
        yield biller


@pytest.fixture
def webhook() -> Iterator[HTTPRecorder]:
    with HTTPRecorder() as receiver:
        yield receiver


@pytest.fixture
def parity_config(
    make_config: Callable[..., Config], legacy: Legacy, webhook: HTTPRecorder
) -> Callable[..., Config]:
    def make(with_legacy: bool = True, **parity_settings: Any) -> Config:
        sections: dict[str, Any] = {
            "parity": {
                "meter": "gbs",
                "hmac_secret": SECRET,
                "settle_seconds": 1800,
                "backfill_buckets": 2,
                "alert": {"webhook_url": webhook.url + "/hook"},
                **parity_settings,
            }
        }
        if with_legacy:
            sections["legacy"] = {"backend": "http", "url": legacy.server.url + "/usage"}
        return make_config(**sections)

    return make


@pytest.fixture
async def plane(
    parity_config: Callable[..., Config], clock: list[float]
) -> AsyncIterator[ControlPlane]:
    async with ControlPlane(parity_config(), clock=lambda: clock[0]) as cp:
        yield cp


async def _client(config: Config, clock: list[float]) -> AsyncTestClient[Any]:
    """The app with its own ControlPlane: the test client serves it from another event loop,
    so tests feed data and run the checker through a plane of their own on the same files."""
    plane = ControlPlane(config, clock=lambda: clock[0])
    return AsyncTestClient(app=create_app(config, cp=plane))


async def ingest(cp: ControlPlane, org: str, bucket: int, ticks: int, mb: int = 1024) -> None:
    """`ticks` 20-second ticks of `mb` MB inside the bucket: ticks * mb * 20 / 1024 GB-s."""
    await cp.ingest(
        [tick(f"{org}-{bucket}-{i}", org, bucket + 20 * i, mb=mb, s=20) for i in range(ticks)],
        "test",
    )


def signed(query: str, at: float, secret: str = SECRET) -> dict[str, str]:
    timestamp = str(int(at))
    return {"X-Timestamp": timestamp, "X-Signature": parity.sign(secret, timestamp, PATH, query)}


# the endpoint ----------------------------------------------------------------------------------


async def test_without_legacy_the_endpoint_serves_the_control_planes_side(
    parity_config: Callable[..., Config], clock: list[float]
) -> None:
    config = parity_config(with_legacy=False)
    async with ControlPlane(config) as cp:
        await ingest(cp, "acme", T0, 3)  # 3 * 20 = 60 GB-s
        await ingest(cp, "acme", T0 + HOUR, 1)  # outside the window
        await ingest(cp, "beta", T0, 1, mb=512)  # 10 GB-s
        await cp.ingest([{"id": "c", "type": "call", "subject": "gamma", "ts": T0 * 1000}], "t")
    async with await _client(config, clock) as client:
        r = await client.get(PATH, params={"from": T0, "to": T0 + HOUR}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["summary"]["status"] == "no_legacy"
    assert [(o["org_id"], o["controlplane"], o["legacy"]) for o in body["orgs"]] == [
        ("acme", "60", None),
        ("beta", "10", None),
    ]  # gamma has no usage of the parity meter
    assert body["summary"]["totals"] == {
        "controlplane": "70",
        "legacy": None,
        "drift": None,
        "relative_drift": None,
        "within_tolerance": None,
    }


async def test_endpoint_compares_every_org_of_both_sides(
    parity_config: Callable[..., Config], clock: list[float], legacy: Legacy, plane: ControlPlane
) -> None:
    legacy.usage[T0] = {"same": "60", "under": "100", "legacy-only": "5"}
    legacy.usage[T0 + HOUR] = {"same": "999"}  # outside the window
    await ingest(plane, "same", T0, 3)
    # each tick is 993 * 20 / 1024 = 19.39453125, kept as 19.394531: 3.03 % under
    await ingest(plane, "under", T0, 5, mb=993)
    await ingest(plane, "cp-only", T0, 1)
    async with await _client(parity_config(), clock) as client:
        r = await client.get(PATH, params={"from": T0, "to": T0 + HOUR}, headers=AUTH)
        assert r.status_code == 200, r.text
        only = await client.get(
            PATH, params={"from": T0, "to": T0 + HOUR, "mismatches_only": "true"}, headers=AUTH
        )
    body = r.json()
    orgs = {o["org_id"]: o for o in body["orgs"]}
    assert set(orgs) == {"same", "under", "legacy-only", "cp-only"}
    assert orgs["same"] == {
        "org_id": "same",
        "controlplane": "60",
        "legacy": "60",
        "side": "both",
        "drift": "0",
        "absolute_drift": "0",
        "relative_drift": "0",
        "within_tolerance": True,
    }
    assert orgs["under"]["controlplane"] == "96.972655"
    assert orgs["under"]["drift"] == "-3.027345"
    assert orgs["under"]["relative_drift"] == "0.030274"  # 0.03027345, rounded up
    assert orgs["under"]["within_tolerance"] is False
    assert orgs["cp-only"]["side"] == "controlplane" and orgs["cp-only"]["legacy"] is None
    assert orgs["cp-only"]["relative_drift"] is None
    assert orgs["legacy-only"]["side"] == "legacy" and orgs["legacy-only"]["controlplane"] is None
    assert orgs["legacy-only"]["relative_drift"] == "1"
    summary = body["summary"]
    assert (summary["status"], summary["orgs"], summary["mismatches"]) == ("mismatch", 4, 3)
    assert (summary["only_controlplane"], summary["only_legacy"]) == (1, 1)
    assert summary["worst"]["org_id"] == "cp-only"
    assert summary["totals"]["controlplane"] == "176.972655"
    assert summary["totals"]["legacy"] == "165"
    assert [o["org_id"] for o in only.json()["orgs"]] == ["cp-only", "legacy-only", "under"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": T0 + 1, "to": T0 + HOUR}, "from"),
        ({"from": T0, "to": T0 + HOUR + 60}, "to"),
        ({"from": T0 + HOUR, "to": T0}, "to"),
        ({"from": T0}, "to"),
        ({"from": "soon", "to": T0}, "from"),
    ],
)
async def test_window_must_be_bucket_aligned(
    parity_config: Callable[..., Config],
    clock: list[float],
    params: dict[str, int],
    field: str,
) -> None:
    async with await _client(parity_config(), clock) as client:
        r = await client.get(PATH, params=params, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert field in [e["field"] for e in r.json()["errors"]]


async def test_token_needs_the_parity_scope(
    parity_config: Callable[..., Config], clock: list[float]
) -> None:
    window = {"from": T0, "to": T0 + HOUR}
    async with await _client(parity_config(), clock) as client:
        assert (await client.get(PATH, params=window)).status_code == 401
        read_only = {"Authorization": f"Bearer {READ_TOKEN}"}
        assert (await client.get(PATH, params=window, headers=read_only)).status_code == 403
        assert (await client.get(PATH, params=window, headers=AUTH)).status_code == 200


async def test_signed_requests_valid_expired_tampered_and_wrong_secret(
    parity_config: Callable[..., Config], clock: list[float]
) -> None:
    query = f"from={T0}&to={T0 + HOUR}"
    other = f"from={T0}&to={T0 + 2 * HOUR}"
    now = clock[0]
    async with await _client(parity_config(), clock) as client:

        async def get(query: str, headers: dict[str, str]) -> Any:
            return await client.get(f"{PATH}?{query}", headers=headers)

        ok = await get(query, signed(query, now))
        assert ok.status_code == 200, ok.text
        assert (await get(query, signed(query, now - 290))).status_code == 200
        expired = await get(query, signed(query, now - 301))
        assert expired.status_code == 401 and "window" in expired.json()["detail"]
        future = await get(query, signed(query, now + 301))
        assert future.status_code == 401
        tampered = await get(other, signed(query, now))
        assert tampered.status_code == 401 and "does not match" in tampered.json()["detail"]
        wrong = await get(query, signed(query, now, secret="not-the-secret"))
        assert wrong.status_code == 401
        half = await get(query, {"X-Timestamp": str(int(now))})
        assert half.status_code == 401
        # a signature is judged on its own, even beside a valid token
        both = await get(query, {**AUTH, **signed(query, now, secret="nope")})
        assert both.status_code == 401


async def test_signed_requests_are_refused_when_no_secret_is_configured(
    parity_config: Callable[..., Config], clock: list[float]
) -> None:
    query = f"from={T0}&to={T0 + HOUR}"
    async with await _client(parity_config(hmac_secret=None), clock) as client:
        r = await client.get(f"{PATH}?{query}", headers=signed(query, clock[0]))
    assert r.status_code == 401 and "not enabled" in r.json()["detail"]


async def test_legacy_failure_is_reported_not_hidden(
    parity_config: Callable[..., Config], clock: list[float], legacy: Legacy
) -> None:
    legacy.fail = True
    async with await _client(parity_config(), clock) as client:
        r = await client.get(PATH, params={"from": T0, "to": T0 + HOUR}, headers=AUTH)
    assert r.status_code == 503
    assert r.json()["detail"] == "legacy usage endpoint answered 500"


# per-bucket totals -------------------------------------------------------------------------------


async def test_bucket_totals_always_equal_the_sum_of_meter_values(plane: ControlPlane) -> None:
    await ingest(plane, "a", T0, 4)
    await ingest(plane, "a", T0, 4)  # duplicates: not stored, not counted
    await ingest(plane, "a", T0 + HOUR, 2, mb=333)
    await ingest(plane, "b", T0, 1)
    db = plane.config.storage.path  # type: ignore[attr-defined]
    with sqlite3.connect(db) as conn:
        raw = conn.execute(
            "SELECT meter, org_id, bucket_start, sum(micros) FROM meter_values"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ).fetchall()
        kept = conn.execute(
            "SELECT meter, org_id, bucket_start, micros FROM bucket_totals ORDER BY 1, 2, 3"
        ).fetchall()
    assert kept == raw and len(raw) == 3
    assert await plane.storage.usage_by_org("gbs", T0, T0 + 2 * HOUR) == {
        "a": 80_000_000 + 13_007_812,
        "b": 20_000_000,
    }
    assert await plane.storage.usage_by_org("gbs", T0 + HOUR, T0 + 2 * HOUR) == {"a": 13_007_812}


async def test_narrow_and_wide_windows_read_the_same_totals(plane: ControlPlane) -> None:
    """Narrow windows read through the bucket index, wide ones scan the history: both must
    equal a plain GROUP BY over meter_values, for every window."""
    for b in range(17):
        for org, ticks in (("a", 1 + b % 3), ("b", 2), ("c", b % 2)):
            if ticks:
                await ingest(plane, org, T0 + b * HOUR, ticks, mb=64 * (b + 1))
    db = plane.config.storage.path  # type: ignore[attr-defined]
    with sqlite3.connect(db) as conn:
        for start_b, width in [(0, 1), (5, 1), (16, 1), (3, 2), (0, 3), (4, 9), (0, 17), (-3, 40)]:
            start, end = T0 + start_b * HOUR, T0 + (start_b + width) * HOUR
            expected = dict(
                conn.execute(
                    "SELECT org_id, sum(micros) FROM meter_values WHERE meter = 'gbs'"
                    " AND bucket_start >= ? AND bucket_start < ? GROUP BY org_id",
                    (start, end),
                ).fetchall()
            )
            assert await plane.storage.usage_by_org("gbs", start, end) == expected, (start_b, width)
    assert await plane.storage.usage_by_org("gbs", T0 + 17 * HOUR, T0 + 18 * HOUR) == {}
    assert await plane.storage.usage_by_org("nope", T0, T0 + HOUR) == {}


async def test_migration_fills_bucket_totals_from_existing_events(tmp_path: Path) -> None:
    from controlplane import migrations

    db = tmp_path / "old.db"
    first = migrations.available("sqlite")[0]
    with sqlite3.connect(db) as conn:
        conn.executescript(first.sql)
        conn.execute("INSERT INTO usage_events VALUES (1, 's', 'e1', 't', 'a', 0, '{}', 0)")
        conn.execute("INSERT INTO usage_events VALUES (2, 's', 'e2', 't', 'a', 0, '{}', 0)")
        conn.execute("INSERT INTO meter_values VALUES (1, 'gbs', 'a', 0, 5), (2, 'gbs', 'a', 0, 7)")
        conn.execute(
            "CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, checksum TEXT NOT NULL,"
            " applied_at INTEGER NOT NULL)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (first.name, first.checksum))
    from controlplane.plugins.storage.sqlite import SQLiteStorage, SQLiteStorageConfig

    storage = SQLiteStorage(SQLiteStorageConfig(path=str(db)))
    await storage.start()
    try:
        assert (await storage.migrate())[0] == "0002_parity"
        assert await storage.usage_by_org("gbs", 0, HOUR) == {"a": 12}
    finally:
        await storage.close()


# the checker -------------------------------------------------------------------------------------


async def test_checker_checks_each_settled_bucket_once(
    plane: ControlPlane, legacy: Legacy, clock: list[float]
) -> None:
    for b in range(4):
        await ingest(plane, "acme", T0 + b * HOUR, 3)
        legacy.usage[T0 + b * HOUR] = {"acme": "60"}
    clock[0] = T0 + 2 * HOUR + 1799  # B1 ended 1799 s ago: not settled (settle 1800)
    stats = await plane.parity_check()
    # first pass: backfill 2 buckets back from the settled end (B1) -> only B0 is settled
    assert [r.bucket_start for r in await plane.storage.parity_runs("gbs")] == [T0, T0 - HOUR]
    assert stats.checked == 2 and stats.clean == 2
    clock[0] = T0 + 2 * HOUR + 1800
    assert (await plane.parity_check()).checked == 1
    assert (await plane.parity_check()).checked == 0  # each bucket once
    runs = await plane.storage.parity_runs("gbs")
    assert [r.bucket_start for r in runs] == [T0 + HOUR, T0, T0 - HOUR]
    assert runs[0].controlplane_micros == runs[0].legacy_micros == 60_000_000
    since = await plane.parity_clean_since()
    assert (since.since, since.until, since.buckets) == (T0 - HOUR, T0 + 2 * HOUR, 3)


async def test_checker_does_not_record_a_bucket_when_the_legacy_source_fails(
    plane: ControlPlane, legacy: Legacy, clock: list[float]
) -> None:
    from controlplane.interfaces import LegacyError

    clock[0] = T0 + HOUR + 1800
    legacy.fail = True
    with pytest.raises(LegacyError):
        await plane.record("parity", plane.parity_check)
    assert await plane.storage.parity_runs("gbs") == []
    (job,) = await plane.storage.job_runs("parity")
    assert job.outcome == "error" and "answered 500" in (job.error or "")
    legacy.fail = False
    assert (await plane.parity_check()).checked == 2


async def test_checker_is_skipped_without_a_legacy_source(
    parity_config: Callable[..., Config], clock: list[float]
) -> None:
    async with ControlPlane(parity_config(with_legacy=False), clock=lambda: clock[0]) as cp:
        stats = await cp.record("parity", cp.parity_check)
        assert stats.skipped and "no legacy source" in stats.skipped
        (job,) = await cp.storage.job_runs("parity")
        assert job.outcome == "skipped"


async def test_alert_after_two_alarming_buckets_once_then_suppressed(
    plane: ControlPlane, legacy: Legacy, webhook: HTTPRecorder, clock: list[float]
) -> None:
    # B0 agrees; from B1 on the legacy biller misses an org worth more than 10 % of the total
    for b in range(5):
        start = T0 + b * HOUR
        await ingest(plane, "acme", start, 30)  # 600 GB-s
        legacy.usage[start] = {"acme": "600"}
        if b >= 1:
            await ingest(plane, "lost", start, 10)  # 200 GB-s, absent from the legacy side
    sent: list[int] = []
    for b in range(1, 5):
        clock[0] = T0 + b * HOUR + 1800
        with capture_logs() as logs:
            await plane.parity_check()
        sent.append(len(webhook.requests))
        if b == 3:
            events = [e for e in logs if e["event"] == "parity.alert"]
            assert len(events) == 1 and events[0]["dedup_key"] == f"parity:gbs:{T0 + HOUR}"
            assert events[0]["log_level"] == "warning"
        if b == 4:
            assert [e["event"] for e in logs if e["event"].startswith("parity.alert")] == [
                "parity.alert_suppressed"
            ]
    assert sent == [0, 0, 1, 1]  # after B1 and B2 are both alarming; B3 suppressed
    (hook,) = webhook.requests
    assert hook.method == "POST" and hook.path == "/hook"
    body = hook.json()
    assert body["dedup_key"] == f"parity:gbs:{T0 + HOUR}"
    assert "2 consecutive buckets" in body["text"] and "lost" in body["text"]
    alerts = await plane.storage.parity_alerts("gbs")
    assert [(a.bucket_start, a.state) for a in alerts] == [
        (T0 + 3 * HOUR, "suppressed"),
        (T0 + 2 * HOUR, "sent"),
    ]
    assert (await plane.parity_clean_since()).since is None


async def test_failed_alert_delivery_is_retried_on_the_next_pass(
    plane: ControlPlane, legacy: Legacy, webhook: HTTPRecorder, clock: list[float]
) -> None:
    for b in range(2):
        await ingest(plane, "lost", T0 + b * HOUR, 10)
        legacy.usage[T0 + b * HOUR] = {"acme": "0"}
    webhook.route = lambda _r: (503, {"error": "busy"})
    clock[0] = T0 + 2 * HOUR + 1800
    with capture_logs() as logs:
        stats = await plane.parity_check()
    assert stats.alerts == 1 and stats.delivered == 0
    failed = [e for e in logs if e["event"] == "parity.alert_failed"]
    assert failed and failed[0]["error"] == "webhook answered 503" and not failed[0]["final"]
    assert webhook.url.split("//")[1] not in str(logs)  # the URL is a secret: never logged
    webhook.route = lambda _r: (200, {"ok": True})
    stats = await plane.parity_check()
    assert stats.checked == 0 and stats.delivered == 1
    (alert,) = await plane.storage.parity_alerts("gbs")
    assert (alert.state, alert.attempts) == ("sent", 2)
    assert len(webhook.requests) == 2


async def test_runs_endpoints(
    parity_config: Callable[..., Config], clock: list[float], legacy: Legacy, plane: ControlPlane
) -> None:
    clock[0] = T0 + 2 * HOUR + 1800
    await ingest(plane, "acme", T0 + HOUR, 3)
    legacy.usage[T0 + HOUR] = {"acme": "55"}
    await plane.parity_check()
    async with await _client(parity_config(), clock) as client:
        read = {"Authorization": f"Bearer {READ_TOKEN}"}
        runs = await client.get("/v1/parity/runs", headers=read)
        assert runs.status_code == 200, runs.text
        body = runs.json()
        assert body["clean"] == {"since": None, "until": T0 + 2 * HOUR, "buckets": 0, "seconds": 0}
        newest = body["runs"][0]
        assert (newest["bucket_start"], newest["status"], newest["mismatches"]) == (
            T0 + HOUR,
            "mismatch",
            1,
        )
        assert newest["totals"] == {"controlplane": "60", "legacy": "55", "drift": "5"}
        assert body["runs"][1]["status"] == "clean"
        one = await client.get(f"/v1/parity/runs/{newest['id']}", headers=AUTH)
        assert one.json()["mismatching_orgs"] == [
            {
                "org_id": "acme",
                "controlplane": "60",
                "legacy": "55",
                "drift": "5",
                "relative_drift": "0.09091",  # 0.0909090.., rounded up
            }
        ]
        assert (await client.get("/v1/parity/runs/999", headers=AUTH)).status_code == 404
        clean = await client.get("/v1/parity/clean-since", headers=AUTH)
        assert clean.json()["since"] is None
        assert (await client.get("/v1/parity/runs")).status_code == 401


# the CLI -----------------------------------------------------------------------------------------


async def _check_cli(config: Config, *argv: str) -> int:
    args = cli.build_parser().parse_args(["parity", "check", *argv])
    assert isinstance(args, argparse.Namespace)
    return await parity_cmd(args, config)


async def test_cli_parity_check_prints_a_table_and_exits_non_zero_on_mismatch(
    parity_config: Callable[..., Config],
    legacy: Legacy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = parity_config()
    async with ControlPlane(config) as cp:
        await ingest(cp, "acme", T0, 3)
        await ingest(cp, "beta", T0 + HOUR, 3)
    legacy.usage[T0] = {"acme": "60"}
    legacy.usage[T0 + HOUR] = {"beta": "50"}
    assert await _check_cli(config, "--from", str(T0), "--to", str(T0 + HOUR)) == 0
    out = capsys.readouterr().out
    assert "status: clean" in out and "acme" not in out.split("\n")[0]
    code = await _check_cli(
        config, "--from", "2026-01-01T00:00:00Z", "--to", "2026-01-01T02:00:00Z", "--all"
    )
    assert code == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["org", "controlplane", "legacy", "drift", "relative", "ok"]
    assert lines[1].split() == ["acme", "60", "60", "0", "0", "yes"]
    assert lines[2].split() == ["beta", "60", "50", "10", "0.2", "NO"]
    assert "status: mismatch" in out
    no_legacy = parity_config(with_legacy=False)
    assert await _check_cli(no_legacy, "--from", str(T0), "--to", str(T0 + HOUR)) == 3
    assert Decimal("0.2") == Decimal(lines[2].split()[4])
