"""The web console in a real browser: Debian's chromium driven by Playwright, against
`controlplane serve` in its own process.

The server has a SQL legacy source (a SQLite file this test writes) and a parity history the
scheduled checker builds on its first pass: usage on both sides for the last 30 hours, one
bucket where they disagree, clean since. Two orgs are on the billable plan with a customer and
nothing is published, so a cutover at the next hour passes preflight.

Each page is saved as a screenshot in the test's temporary folder; with
``CONSOLE_SCREENSHOTS=<folder>`` the overview and parity pages are also copied there as
``console-overview.png`` and ``console-parity.png`` (how docs/ gets them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.conftest import READ_TOKEN, TOKEN, token_hash
from tests.e2e.processes import ROOT, Server, base_config, bearer

playwright = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

pytestmark = pytest.mark.e2e

HOUR = 3600
NOW_HOUR = int(time.time()) // HOUR * HOUR
FIRST = NOW_HOUR - 30 * HOUR  # buckets [FIRST, LAST) carry usage on both sides
LAST = NOW_HOUR - 3 * HOUR
DRIFTING = NOW_HOUR - 20 * HOUR  # globex: 300 here, 290 at the legacy biller
ORGS = {"acme": "cus_acme", "globex": "cus_globex"}
CHROMIUM = shutil.which("chromium")
PAGES = ["overview", "parity", "ledger", "cutover", "orgs", "audit"]


def usage(org: str, bucket: int) -> int:
    return 100 + (bucket // HOUR) % 7 * 10 + (5 if org == "globex" else 0)


def seed(tmp: Path) -> tuple[Path, Path]:
    """The events file for `controlplane ingest` and the legacy biller's database."""
    events = tmp / "events.ndjson"
    legacy = tmp / "legacy.db"
    db = sqlite3.connect(legacy)
    db.execute("CREATE TABLE usage (org_id TEXT, bucket INTEGER, value INTEGER)")
    with events.open("w") as out:
        for bucket in range(FIRST, LAST, HOUR):
            for org in ORGS:
                ours = 300 if (org, bucket) == ("globex", DRIFTING) else usage(org, bucket)
                theirs = 290 if (org, bucket) == ("globex", DRIFTING) else ours
                event = {
                    "id": f"{org}-{bucket}",
                    "type": "tick",
                    "subject": org,
                    "ts": (bucket + 60) * 1000,
                    "data": {"mb": 1024, "s": ours},  # gbs = mb * s / 1024 = ours
                }
                out.write(json.dumps(event) + "\n")
                db.execute("INSERT INTO usage VALUES (?, ?, ?)", (org, bucket, theirs))
    db.commit()
    db.close()
    return events, legacy


CAPABILITY_KEY = (
    Ed25519PrivateKey.generate()
    .private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    .decode()
)


def config_text(tmp: Path, legacy: Path) -> str:
    group = "GROUP BY org_id"
    return (
        base_config(tmp / "cp.db")
        + f"""
[[auth.tokens]]
name = "viewer"
sha256 = "{token_hash(READ_TOKEN)}"
scopes = ["read"]

[rollup]
interval_seconds = 1

[parity]
meter = "gbs"
interval_seconds = 1
backfill_buckets = 40

[cutover]
parity_clean_hours = 6

[[capabilities.keys]]
kid = "k1"
private_key = '''{CAPABILITY_KEY}'''

[legacy]
backend = "sql"
dsn = "sqlite:///{legacy}"
query = "SELECT org_id, sum(value) FROM usage WHERE bucket >= :start AND bucket < :end {group}"
billed_until_query = "SELECT max(bucket) + 3600 FROM usage"
"""
    )


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console")
    events, legacy = seed(tmp)
    config = tmp / "controlplane.toml"
    config.write_text(config_text(tmp, legacy))
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "ingest", str(events), "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    srv = Server(config, tmp / "server.log")
    srv.start()
    try:
        for org, customer in ORGS.items():
            answer = httpx.put(
                f"{srv.url}/v1/orgs/{org}",
                json={"customer": customer, "plan": "pro", "effective_from": 0, "reason": "e2e"},
                headers=bearer(TOKEN),
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
        wait_for_parity(srv)
        yield srv
    finally:
        srv.stop()
    assert TOKEN not in srv.output() and READ_TOKEN not in srv.output()  # never logged


def wait_for_parity(srv: Server, timeout: float = 60.0) -> None:
    """Until the checker's first pass has stored its runs and is up to date."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        clean = api(srv, "GET", "/v1/parity/clean-since")
        if clean["since"] is not None and clean["until"] >= NOW_HOUR - 2 * HOUR:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the parity checker did not catch up:\n{srv.output()}")


def api(srv: Server, method: str, path: str, **kwargs: Any) -> Any:
    answer = httpx.request(method, srv.url + path, headers=bearer(TOKEN), timeout=10, **kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("chromium is missing: `./run test` installs it from Debian's packages")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def signed_in(browser: Browser, srv: Server, token: str) -> Page:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{srv.url}/console/")
    expect(page).to_have_url(f"{srv.url}/console/sign-in")  # not signed in: sent to sign in
    page.get_by_label("Bearer token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{srv.url}/console/")
    return page


def nav(page: Page, name: str) -> None:
    page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()


UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button')]
    .filter(el => el.type !== 'hidden')
    .filter(el => el.tagName === 'BUTTON'
        ? !el.textContent.trim()
        : !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
    .map(el => el.outerHTML)"""


def shoot(page: Page, shots: Path, name: str) -> None:
    path = shots / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    to = os.environ.get("CONSOLE_SCREENSHOTS")
    if to and name in ("overview", "parity"):
        shutil.copy(path, Path(to) / path.name)


# ---------------------------------------------------------------------------------------------


def test_sign_in_gives_a_strict_httponly_session_and_shows_the_flags(
    browser: Browser, server: Server, shots: Path
) -> None:
    page = signed_in(browser, server, TOKEN)
    [cookie] = [c for c in page.context.cookies() if c["name"] == "cp_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # plain HTTP here; over HTTPS it is Secure (tests/unit)
    assert TOKEN not in cookie["value"] and TOKEN not in page.content()

    flags = api(server, "GET", "/v1/flags")
    stage = api(server, "GET", "/v1/cutover")["stage"]
    expect(page.locator("#stage")).to_have_text(stage)
    expect(page.locator("#authority")).to_have_text(flags["flags"]["authority"]["value"])
    expect(page.locator("#shadow")).to_have_text(
        "on" if flags["flags"]["shadow"]["value"] else "off"
    )
    for name, flag in flags["flags"].items():
        row = page.locator(f'tr[data-flag="{name}"]')
        expect(row.locator("td").nth(1)).to_have_text(flag["source"])
    expect(page.locator("#last-parity")).to_contain_text("clean")
    expect(page.get_by_role("table", name="Health of the scheduled jobs")).to_contain_text("parity")
    shoot(page, shots, "overview")

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{server.url}/console/sign-in")
    page.goto(f"{server.url}/console/cutover")
    expect(page).to_have_url(f"{server.url}/console/sign-in")  # the session is gone
    page.close()


def test_a_wrong_token_is_refused(browser: Browser, server: Server) -> None:
    page = browser.new_page()
    page.goto(f"{server.url}/console/sign-in")
    page.get_by_label("Bearer token").fill("cp_not_a_token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("unknown token")
    assert "cp_not_a_token" not in page.content()
    page.close()


def test_the_parity_page_draws_one_point_per_stored_run(
    browser: Browser, server: Server, shots: Path
) -> None:
    page = signed_in(browser, server, TOKEN)
    nav(page, "Parity")
    chart = page.get_by_role("img", name="Parity drift (%) per checked bucket")
    points = chart.locator("g.point")
    expect(chart).to_be_visible()
    for _ in range(3):  # the checker may store a run between the page and the API's answer
        drawn = sorted(int(p.get_attribute("data-run") or 0) for p in points.all())
        runs = api(server, "GET", "/v1/parity/runs", params={"limit": 1000})["runs"]
        if drawn == sorted(r["id"] for r in runs):
            break
        page.reload()
        expect(chart).to_be_visible()
    assert drawn == sorted(r["id"] for r in runs) and len(runs) >= 27
    drifting = [r for r in runs if r["status"] == "mismatch"]
    assert [r["bucket_start"] for r in drifting] == [DRIFTING]
    mismatch = chart.locator(f'g.point[data-run="{drifting[0]["id"]}"]')
    assert mismatch.get_attribute("data-status") == "mismatch"
    expect(mismatch.locator("rect")).to_have_count(1)  # a square: not told by colour alone
    percent = Decimal(10 * 100) / (usage("acme", DRIFTING) + 290)  # of the legacy total
    expect(mismatch.locator("title")).to_contain_text(f"{percent.quantize(Decimal('0.01'))} %")
    expect(page.locator("#mismatching")).to_contain_text("globex")
    expect(page.locator("#mismatching")).to_contain_text("300")
    expect(page.locator("#clean-since")).not_to_have_text("not clean")
    shoot(page, shots, "parity")

    # the worst orgs of a chosen window; a window off the bucket boundaries is refused
    page.get_by_label("From (unix seconds or RFC 3339, a bucket boundary)").fill(str(DRIFTING))
    page.get_by_label("To (exclusive)").fill(
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(DRIFTING + HOUR))
    )
    page.get_by_role("button", name="Compare").click()
    worst = page.locator("#worst tbody tr")
    expect(worst).to_have_count(2)
    expect(worst.first.locator("th")).to_have_text("globex")
    expect(worst.first.locator("td").nth(2)).to_have_text("10")
    expect(page.locator("#window-summary")).to_contain_text("1 of 2 orgs mismatching")
    page.get_by_label("To (exclusive)").fill(str(DRIFTING + 60))
    page.get_by_role("button", name="Compare").click()
    expect(page.locator("#window-error")).to_contain_text("to")
    page.close()


def test_plan_preflight_execute_and_roll_back_a_cutover(
    browser: Browser, server: Server, shots: Path
) -> None:
    t = NOW_HOUR + HOUR
    page = signed_in(browser, server, TOKEN)
    nav(page, "Cutover")
    expect(page.locator("#stage")).to_have_text("shadow")

    page.get_by_label("T (unix seconds or RFC 3339)").first.fill(
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    )
    page.get_by_role("button", name="Plan").click()
    expect(page.locator("#plan")).to_contain_text(f"Plan for T = {t}")
    expect(page.locator("#plan")).to_contain_text("control plane: buckets starting at or after")

    page.locator("#preflight-at").fill(str(t))
    page.get_by_role("button", name="Run preflight").click()
    expect(page.locator("#preflight-result")).to_have_text("ready")
    for check in ("t_valid", "billable_orgs_have_customer", "parity_clean"):
        expect(page.locator(f'tr[data-check="{check}"] td').first).to_have_text("PASS")
    expect(page.locator('tr[data-check="catalog_published"] td').first).to_have_text("N/A")
    shoot(page, shots, "cutover")

    # T typed again wrong: refused, nothing changed
    page.locator("#execute-at").fill(str(t))
    page.locator("#execute-confirm").fill(str(t + HOUR))
    page.locator("#execute-reason").fill("soak done")
    page.get_by_role("button", name="Execute cutover").click()
    expect(page.get_by_role("alert")).to_contain_text("does not match")
    assert api(server, "GET", "/v1/cutover")["stage"] == "shadow"

    # from the keyboard: focus T, type, tab through the confirmation and the reason, Enter
    page.locator("#execute-at").focus()
    page.keyboard.type(str(t))
    page.keyboard.press("Tab")
    page.keyboard.type(str(t))
    page.keyboard.press("Tab")
    page.keyboard.type("soak done")
    page.keyboard.press("Enter")
    expect(page.locator("#executed")).to_contain_text(f"from {t}")
    expect(page.locator("#stage")).to_have_text("live")
    status = api(server, "GET", "/v1/cutover")
    assert status["stage"] == "live" and status["flags"]["legacy_bill_until"] == t
    assert status["history"][0]["step"] == "execute" and status["history"][0]["actor"] == "e2e"
    assert status["history"][0]["forced"] is False

    nav(page, "Overview")
    expect(page.locator("#stage")).to_have_text("live")
    expect(page.locator("#authority")).to_have_text("controlplane")
    expect(page.locator("#legacy-bill-until")).to_contain_text(str(t))

    nav(page, "Cutover")
    preview = page.get_by_role("table", name="Sent (or attempted) less than 86400 s ago")
    expect(preview).to_contain_text("None.")  # nothing was sent: no billing configured
    page.locator("#rollback-reason").fill("back to legacy")
    page.get_by_label("Cancel rows sent less than").check()
    page.get_by_role("button", name="Roll back").click()
    expect(page.locator("#rolled-back")).to_contain_text("Rolled back")
    expect(page.locator("#stage")).to_have_text("rolled_back")
    status = api(server, "GET", "/v1/cutover")
    assert status["stage"] == "rolled_back" and status["history"][0]["actor"] == "e2e"

    nav(page, "Audit")
    expect(page.locator("#entries")).to_contain_text("cutover.execute")
    page.get_by_role("button", name="Verify the whole chain").click()
    expect(page.locator("#verified")).to_contain_text("Chain holds")
    shoot(page, shots, "audit")
    page.close()


def test_orgs_and_ledger_pages(browser: Browser, server: Server, shots: Path) -> None:
    page = signed_in(browser, server, TOKEN)
    nav(page, "Orgs")
    page.get_by_label("Org id").fill("globex")
    page.get_by_label("Org id").press("Enter")
    expect(page.locator("#customer")).to_have_text("cus_globex")
    expect(page.locator("#plans")).to_contain_text("pro")
    page.get_by_role("button", name="Issue a token for globex").click()
    token = page.get_by_label(re.compile("^Token for globex")).input_value()
    assert token.count(".") == 2  # a JWT, shown once
    issued = page.get_by_role("table", name=re.compile("^Issued for globex"))
    expect(issued.locator("tbody tr")).to_have_count(1)
    expect(issued.locator("tbody tr")).to_contain_text("pro")
    shoot(page, shots, "orgs")

    nav(page, "Ledger")
    expect(page.get_by_role("table", name="Rows by state and reason")).to_be_visible()
    page.get_by_label("Org id").fill("acme")
    page.get_by_role("button", name="Show rows").click()
    rows = page.get_by_role("table", name="Ledger rows of acme (the oldest 200)")
    expect(rows).to_be_visible()
    expect(rows.locator("tbody tr").first).to_contain_text("gbs")
    shoot(page, shots, "ledger")
    rows.get_by_role("link", name="History").first.click()  # one row's revisions
    history = page.get_by_role("table", name="Every revision of the row, oldest first")
    expect(history.locator("tbody tr")).to_have_count(1)
    expect(history.locator("tbody tr td").nth(4)).not_to_be_empty()
    page.close()


def test_a_read_token_sees_no_action_and_forged_posts_change_nothing(
    browser: Browser, server: Server
) -> None:
    before = api(server, "GET", "/v1/cutover")
    reader = signed_in(browser, server, READ_TOKEN)
    nav(reader, "Cutover")
    expect(reader.locator("#read-only")).to_be_visible()
    expect(reader.locator("form[action^='/console/cutover/']")).to_have_count(0)
    expect(reader.get_by_role("button", name="Execute cutover")).to_have_count(0)

    # a read session with its own (valid) CSRF token: refused for want of admin
    csrf = reader.locator("input[name=csrf]").first.get_attribute("value")
    t = str(NOW_HOUR + HOUR)
    form = {"csrf": csrf, "at": t, "confirm": t, "reason": "forged", "force": "on"}
    answer = reader.request.post(f"{server.url}/console/cutover/execute", form=form)
    assert answer.status == 403 and "admin" in answer.text()
    answer = reader.request.post(
        f"{server.url}/console/cutover/rollback", form={"csrf": csrf, "reason": "forged"}
    )
    assert answer.status == 403

    # an admin session without the CSRF token (or with another's): refused
    admin = signed_in(browser, server, TOKEN)
    for token in (None, csrf, "forged"):
        fields = {k: v for k, v in form.items() if k != "csrf"}
        if token is not None:
            fields["csrf"] = token
        answer = admin.request.post(f"{server.url}/console/cutover/execute", form=fields)
        assert answer.status == 403 and "CSRF" in answer.text()

    after = api(server, "GET", "/v1/cutover")
    assert after == before  # no flag, no history entry changed
    reader.close()
    admin.close()


def test_axe_core_finds_no_violation(browser: Browser, server: Server) -> None:
    """axe-core (shipped inside the axe-playwright-python package, nothing fetched) on every
    page: labels, contrast, landmarks, table headers, names of images."""
    from axe_playwright_python.sync_playwright import Axe

    axe = Axe()
    page = signed_in(browser, server, TOKEN)
    for name in [
        *PAGES,
        "parity?run=1",
        f"parity?from={DRIFTING}&to={DRIFTING + HOUR}",
        "audit?verify=true",
        "ledger?org=acme",
        f"ledger?org=acme&meter=gbs&bucket={FIRST}",
        "orgs?org=acme",
    ]:
        page.goto(f"{server.url}/console/{'' if name == 'overview' else name}")
        results = axe.run(page)
        assert results.violations_count == 0, (name, results.generate_report())
    page.context.clear_cookies()
    page.goto(f"{server.url}/console/sign-in")
    results = axe.run(page)
    assert results.violations_count == 0, ("sign-in", results.generate_report())
    page.close()


def test_every_control_is_labelled(browser: Browser, server: Server) -> None:
    page = signed_in(browser, server, TOKEN)
    for name in PAGES:
        path = "" if name == "overview" else name
        page.goto(f"{server.url}/console/{path}")
        assert page.evaluate(UNLABELLED) == [], name
        assert page.locator("h1").count() == 1, name
        expect(page.locator("nav a[aria-current=page]")).to_have_count(1)
    page.context.clear_cookies()
    page.goto(f"{server.url}/console/sign-in")
    assert page.evaluate(UNLABELLED) == [], "sign-in"
    page.close()
