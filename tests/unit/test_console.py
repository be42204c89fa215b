"""The console's parts without a browser: sessions and their cookie, the CSRF check, the drift
chart, and what a rollback would cancel (browser scenarios: tests/e2e/test_console.py)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import pytest
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane.auth import Principal
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.http.app import create_app
from controlplane.http.console import charts
from controlplane.http.console.session import (
    SESSION_SECONDS,
    Refused,
    Sessions,
    check_csrf,
)
from controlplane.interfaces import ParityRun
from controlplane.plugins.billing.fake import FakeBilling
from tests.conftest import HOUR, T0, TOKEN, tick

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def test_a_session_ends_after_its_time_or_at_sign_out() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    a = sessions.open(Principal("ops", frozenset({"read", "admin"})))
    b = sessions.open(Principal("viewer", frozenset({"read"})))
    assert a.id != b.id and a.csrf != b.csrf and a.admin and not b.admin
    assert sessions.get(a.id) == a and sessions.get("forged") is None and sessions.get(None) is None
    sessions.close(b.id)
    assert sessions.get(b.id) is None
    now[0] += SESSION_SECONDS
    assert sessions.get(a.id) is None  # expired


@pytest.mark.parametrize("sent", [None, "", "other", 5])
def test_a_form_without_the_sessions_csrf_token_is_refused(sent: object) -> None:
    with pytest.raises(Refused, match="CSRF"):
        check_csrf("the-token", {} if sent is None else {"csrf": sent})
    check_csrf("the-token", {"csrf": "the-token"})


def run(run_id: int, bucket: int, ours: int, theirs: int, alarming: bool = False) -> ParityRun:
    return ParityRun(
        meter="gbs",
        bucket_start=bucket,
        bucket_end=bucket + HOUR,
        checked_at=bucket + 3 * HOUR,
        orgs=2,
        mismatches=0 if ours == theirs else 1,
        material=0,
        controlplane_micros=ours,
        legacy_micros=theirs,
        worst_org=None,
        worst_drift_micros=abs(ours - theirs),
        worst_relative=None,
        clean=ours == theirs,
        alarming=alarming,
        alarm_since=None,
        id=run_id,
    )


def test_the_chart_draws_one_shaped_titled_point_per_run_in_bucket_order() -> None:
    runs = [
        run(3, T0 + 2 * HOUR, 300, 200, alarming=True),
        run(1, T0, 100, 100),
        run(2, T0 + HOUR, 103, 100),
    ]
    svg = charts.drift_chart(runs, Decimal(2))
    assert re.findall(r'data-run="(\d+)"', svg) == ["1", "2", "3"]  # oldest bucket first
    assert svg.count("<circle") == 1 and svg.count("<rect") == 1 and svg.count("<polygon") == 1
    assert "drift 3.00 %, mismatch" in svg and "drift 50.00 %, alarming" in svg
    assert charts.drift_percent(runs[0]) == Decimal(50)
    assert charts.drift_percent(run(4, T0, 5, 0)) == Decimal(100)  # legacy 0: all drift
    assert charts.drift_percent(run(5, T0, 0, 0)) == Decimal(0)
    assert "No parity runs stored yet" in charts.drift_chart([], Decimal(2))


@pytest.fixture
async def console(
    make_config: Callable[..., Config], clock: list[float], fake_billing: FakeBilling
) -> AsyncIterator[tuple[AsyncTestClient, ControlPlane]]:  # type: ignore[type-arg]
    cp = ControlPlane(
        make_config(parity={"meter": "gbs"}), billing=fake_billing, clock=lambda: clock[0]
    )
    app = create_app(cp.config, cp=cp)
    async with AsyncTestClient(app, base_url="https://console.test") as client:
        yield client, cp


async def sign_in(client: AsyncTestClient, token: str) -> str:  # type: ignore[type-arg]
    form = await client.get("/console/sign-in")
    [nonce] = CSRF.findall(form.text)
    answer = await client.post(
        "/console/sign-in", data={"csrf": nonce, "token": token}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" in cookie  # https
    page = await client.get("/console/cutover")
    [csrf] = set(CSRF.findall(page.text))
    return csrf


async def test_the_cutover_page_shows_what_a_rollback_would_cancel(
    console: tuple[AsyncTestClient, ControlPlane],  # type: ignore[type-arg]
    clock: list[float],
) -> None:
    client, cp = console
    t = T0 + 9 * HOUR
    await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
    await cp.ingest([tick("a", "o1", t + 5)], "http")
    await cp.rollup(until=t + HOUR)
    await cp.cutover.execute(t, actor="ops", reason="go", force=True)
    await cp.send()
    with capture_logs() as logs:
        csrf = await sign_in(client, TOKEN)
    assert {"event": "console.signed_in", "actor": "tester", "log_level": "info"} in [
        {k: v for k, v in e.items() if k in ("event", "actor", "log_level")} for e in logs
    ]
    session_id = client.cookies.get("cp_console")
    assert session_id and TOKEN not in repr(logs) and session_id not in repr(logs)  # unlogged

    page = (await client.get("/console/cutover")).text
    to_cancel = page.split('id="to-cancel"')[1].split("</table>")[0]
    credit = page.split('id="credit-notes"')[1].split("</table>")[0]
    assert "o1" in to_cancel and "(1)" in to_cancel and "o1" not in credit

    clock[0] += 2 * 86400  # past the cancel window: a credit note, no cancel
    page = (await client.get("/console/cutover")).text
    to_cancel = page.split('id="to-cancel"')[1].split("</table>")[0]
    credit = page.split('id="credit-notes"')[1].split("</table>")[0]
    assert "o1" not in to_cancel and "o1" in credit

    answer = await client.post(
        "/console/cutover/rollback", data={"csrf": csrf, "reason": "undo", "cancel_sent": "on"}
    )
    assert answer.status_code == 200
    assert "1 still at the provider (a credit note, or reconciliation)" in answer.text
    assert (await cp.cutover.status()).history[0]["actor"] == "tester"


async def test_the_orgs_page_issues_a_capability_token_once_and_lists_digests(
    make_config: Callable[..., Config], clock: list[float]
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    pem = (
        Ed25519PrivateKey.generate()
        .private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        .decode()
    )
    cp = ControlPlane(
        make_config(capabilities={"keys": [{"kid": "k1", "private_key": pem}]}),
        clock=lambda: clock[0],
    )
    async with AsyncTestClient(create_app(cp.config, cp=cp), base_url="https://c.test") as client:
        await cp.set_org("acme", customer="cus_1", plan="pro", actor="t", effective_from=0)
        csrf = await sign_in(client, TOKEN)
        page = (await client.get("/console/orgs?org=acme")).text
        assert "No capability token was issued for acme" in page and "Issue a token" in page

        refused = await client.post("/console/orgs/capabilities", data={"org": "acme"})
        assert refused.status_code == 403  # no CSRF token: nothing issued
        assert await cp.audit_entries("capability.") == []

        answer = await client.post("/console/orgs/capabilities", data={"csrf": csrf, "org": "acme"})
        assert answer.status_code == 200
        (record,) = await cp.audit_entries("capability.")
        token = answer.text.split('<textarea id="token" readonly rows="4">')[1].split("<")[0]
        claims = cp.capability_keys.verify(token, org="acme", at=int(clock[0]))
        assert claims.plan == "pro" and record.actor == "tester"

        again = (await client.get("/console/orgs?org=acme")).text
        assert token not in again  # shown once
        assert record.after["digest"] in again.split('id="issued"')[1]


async def test_the_overview_shows_the_newest_reconciliation_and_its_findings(
    console: tuple[AsyncTestClient, ControlPlane],  # type: ignore[type-arg]
    clock: list[float],
    fake_billing: FakeBilling,
) -> None:
    client, cp = console
    await sign_in(client, TOKEN)
    page = (await client.get("/console/")).text
    assert "No reconciliation run stored yet" in page
    t = T0 + 4 * HOUR
    await cp.set_org("o1", customer="cus_1", plan="pro", actor="t", effective_from=0)
    await cp.ingest([tick("a", "o1", t + 5, mb=1024, s=3600)], "http")
    await cp.rollup(until=t + HOUR)
    await cp.cutover.execute(t, actor="ops", reason="go", force=True)
    await cp.send()
    (row,) = await cp.storage.ledger(org_id="o1")
    fake_billing.cancelled.add(row.identifier)  # cancelled at the provider, unknown here
    clock[0] += HOUR  # the call is older than the settle period
    run = await cp.reconciler.run(t, t + HOUR)
    assert run.units_short == row.quantity
    page = (await client.get("/console/")).text
    summary = page.split('id="last-reconciliation"')[1].split("</p>")[0]
    assert "mismatch" in summary and f"{row.quantity} units short" in summary
    findings = page.split('id="reconcile-findings"')[1].split("</table>")[0]
    assert "cus_1" in findings and "short" in findings and "<td>held</td>" in findings
