"""Stripe's asynchronous meter-event errors, end to end: `controlplane serve`, the CLI's sender
and the Stripe emulator (its own process), with the event destination registered through
Stripe's API (`POST /v2/core/event_destinations`) and thin events delivered, signed, by the
emulator on its clock.

A meter event for a customer Stripe does not know is answered 200 (the row is `sent`); when the
validation window ends, the error report arrives and the row becomes `held`/`provider_error`
with Stripe's code, the org's customer is flagged, the code is counted and alerted; a
redelivered report changes nothing; a delivery with a bad signature changes nothing.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

from tests.conftest import HOUR, TOKEN, tick
from tests.e2e.processes import ROOT, Emulator, Server, base_config, bearer

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_meter_errors"
NOW_HOUR = int(time.time()) // HOUR * HOUR
BUCKET = NOW_HOUR - 2 * HOUR
REPORT = "v1.billing.meter.error_report_triggered"
NOT_FOUND = "meter_event_customer_not_found"


def config_text(db: Path, emulator: Emulator, secret: str) -> str:
    return (
        base_config(db)
        + f"""
[rollup]
grace_seconds = 3600
interval_seconds = 3600    # the CLI rolls up and sends, not the scheduler
[sender]
interval_seconds = 3600

[flags]
shadow = false
authority = "controlplane"
bill_from = {BUCKET}

[billing]
backend = "stripe"
api_key = "{API_KEY}"
api_base = "{emulator.url}"
max_retries = 1
backoff_base_seconds = 0.05
backoff_cap_seconds = 0.2

[stripe]
event_destination_secret = "{secret}"
"""
    )


class Stack:
    def __init__(self, tmp_path: Path) -> None:
        self.emulator = Emulator(tmp_path / "emulator.log")
        self.emulator.start()
        self.emu = httpx.Client(base_url=self.emulator.url, timeout=20)
        self.stripe = stripe.StripeClient(
            API_KEY, base_addresses={"api": self.emulator.url}, max_network_retries=0
        )
        self.db = tmp_path / "cp.db"
        self.config = tmp_path / "cp.toml"
        # the server's URL is known before it starts: register the destination first, as an
        # operator would, and configure its signing secret
        self.server = Server(self.config, tmp_path / "server.log")
        destination = self.stripe.v2.core.event_destinations.create(
            {
                "name": "control plane",
                "type": "webhook_endpoint",
                "event_payload": "thin",
                "enabled_events": [REPORT, "v1.billing.meter.no_meter_found"],
                "webhook_endpoint": {"url": f"{self.server.url}/webhooks/stripe/thin"},
                "include": ["webhook_endpoint.signing_secret"],
            }
        )
        assert destination.webhook_endpoint is not None
        self.secret = str(destination.webhook_endpoint.signing_secret)
        self.config.write_text(config_text(self.db, self.emulator, self.secret))
        self.server.start()
        self.api = httpx.Client(base_url=self.server.url, headers=bearer(TOKEN), timeout=20)
        self.stripe.v1.billing.meters.create(
            {
                "display_name": "GB-seconds",
                "event_name": "memory_gb_seconds",
                "default_aggregation": {"formula": "sum"},
            }
        )

    def close(self) -> None:
        self.api.close()
        self.emu.close()
        self.server.stop()
        self.emulator.stop()

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "controlplane", *args, "--config", str(self.config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def org(self, org: str, customer: str) -> None:
        body = {"customer": customer, "plan": "pro", "effective_from": 0, "reason": "test"}
        self.api.put(f"/v1/orgs/{org}", json=body).raise_for_status()

    def ledger(self, org: str) -> list[dict[str, Any]]:
        r = self.api.get("/v1/ledger", params={"org": org})
        r.raise_for_status()
        return r.json()["rows"]  # type: ignore[no-any-return]

    def advance(self, seconds: float) -> None:
        self.emu.post("/_emulator/clock", json={"advance": seconds}).raise_for_status()
        r = self.emu.post("/_emulator/webhooks/flush", json={"timeout": 15})
        assert r.json()["idle"], r.text

    def deliveries(self, **params: str) -> list[dict[str, Any]]:
        r = self.emu.get("/_emulator/deliveries", params=params)
        r.raise_for_status()
        return r.json()["data"]  # type: ignore[no-any-return]

    def count(self, sql: str) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            return int(db.execute(sql).fetchone()[0])

    def metric(self, code: str) -> str | None:
        text = self.api.get("/metrics").text
        prefix = f'controlplane_provider_errors_total{{code="{code}"}} '
        found = [line for line in text.splitlines() if line.startswith(prefix)]
        return found[0][len(prefix) :] if found else None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    except BaseException:
        print("server log:\n", s.server.output(), "\nemulator log:\n", s.emulator.output())
        raise
    finally:
        s.close()


def test_an_unknown_customer_is_answered_200_then_reported_and_held(stack: Stack) -> None:
    good = str(stack.stripe.v1.customers.create({"name": "good"}).id)
    stack.org("good", good)
    stack.org("ghost", "cus_unknown_to_stripe")
    for org in ("good", "ghost"):
        stack.api.post("/v1/events", json=[tick(f"{org}-1", org, BUCKET + 5)]).raise_for_status()
    stack.cli("rollup", "--until", str(BUCKET + HOUR))
    stack.cli("send")
    # Stripe answered 200 for both: the rows are sent
    (ghost_row,) = stack.ledger("ghost")
    (good_row,) = stack.ledger("good")
    assert (ghost_row["state"], good_row["state"]) == ("sent", "sent")
    assert stack.emulator.state()["meter_events_invalid"] == 1

    stack.advance(61)  # the validation window ends: the error report is delivered
    (delivery,) = stack.deliveries(type=REPORT)
    assert delivery["status"] == 200, delivery
    (ghost_row,) = stack.ledger("ghost")
    assert (ghost_row["state"], ghost_row["reason"], ghost_row["detail"]) == (
        "held",
        "provider_error",
        NOT_FOUND,
    )
    assert stack.ledger("good")[0]["state"] == "sent"  # not in the report: untouched
    org = stack.api.get("/v1/orgs/ghost").json()
    assert org["customer_error"] == NOT_FOUND
    assert stack.api.get("/v1/orgs/good").json()["customer_error"] is None
    assert stack.metric(NOT_FOUND) == "1.0"
    alerts = stack.count(
        "SELECT count(*) FROM parity_alerts WHERE meter = 'job:webhooks' "
        f"AND text LIKE '%{NOT_FOUND}%' AND text LIKE '%ghost%'"
    )
    assert alerts == 1
    held_audits = "SELECT count(*) FROM audit_log WHERE action = 'ledger.held'"
    assert stack.count(held_audits) == 1

    # the same thin event again: answered as a duplicate, nothing changes
    stack.emu.post(f"/_emulator/events/{delivery['event']}/redeliver", json={}).raise_for_status()
    stack.advance(0)
    attempts = stack.deliveries(event=delivery["event"])
    assert len(attempts) == 2 and attempts[1]["redelivery"]
    assert attempts[1]["status"] == 200 and '"duplicate":true' in attempts[1]["response"]
    assert stack.count(held_audits) == 1
    assert stack.metric(NOT_FOUND) == "1.0"
    assert stack.ledger("ghost")[0]["updated_at"] == ghost_row["updated_at"]


def test_a_bad_signature_is_refused_and_changes_nothing(stack: Stack) -> None:
    stack.org("ghost", "cus_unknown_to_stripe")
    stack.api.post("/v1/events", json=[tick("g-1", "ghost", BUCKET + 5)]).raise_for_status()
    stack.cli("rollup", "--until", str(BUCKET + HOUR))
    stack.cli("send")
    # hold the delivery, to replay its body with a forged signature first
    stack.emu.post("/_emulator/webhooks", json={"hold": True}).raise_for_status()
    stack.advance(61)
    assert stack.emulator.state()["v2_events"] == 1
    assert stack.deliveries() == []  # held: nothing delivered yet
    body = (
        b'{"id":"evt_test_forged","object":"v2.core.event","type":"%s",'
        b'"created":"2026-01-01T00:00:00.000Z","livemode":false,"context":null,"reason":null,'
        b'"related_object":{"id":"mtr_x","type":"billing.meter","url":"/v1/billing/meters/mtr_x"}}'
    ) % REPORT.encode()
    forged = f"t={int(time.time())},v1={'0' * 64}"
    answer = stack.api.post(
        "/webhooks/stripe/thin",
        content=body,
        headers={"Stripe-Signature": forged, "Content-Type": "application/json"},
    )
    assert answer.status_code == 400
    assert answer.json()["title"] == "Bad signature"
    unsigned = stack.api.post("/webhooks/stripe/thin", content=body)
    assert unsigned.status_code == 400
    assert stack.ledger("ghost")[0]["state"] == "sent"
    assert stack.count("SELECT count(*) FROM webhook_events") == 0
    # released, the genuine delivery is applied
    stack.emu.post("/_emulator/webhooks", json={"hold": False}).raise_for_status()
    stack.advance(0)
    assert stack.ledger("ghost")[0]["reason"] == "provider_error"


def test_releasing_after_the_customer_is_fixed_bills_once_under_a_new_identifier(
    stack: Stack,
) -> None:
    stack.org("ghost", "cus_unknown_to_stripe")
    stack.api.post("/v1/events", json=[tick("g-1", "ghost", BUCKET + 5)]).raise_for_status()
    stack.cli("rollup", "--until", str(BUCKET + HOUR))
    stack.cli("send")
    stack.advance(61)
    (held,) = stack.ledger("ghost")
    assert held["reason"] == "provider_error"
    release = "/v1/orgs/ghost/release-provider-errors"
    refused = stack.api.post(release, json={"reason": "try"})
    assert refused.status_code == 409  # the customer is still flagged
    assert stack.ledger("ghost") == [held]

    real = str(stack.stripe.v1.customers.create({"name": "ghost"}).id)
    stack.api.put("/v1/orgs/ghost", json={"customer": real, "reason": "fixed"}).raise_for_status()
    assert stack.api.get("/v1/orgs/ghost").json()["customer_error"] is None
    done = stack.api.post(release, json={"reason": "customer fixed"})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["released"] == [held["identifier"]]
    (new_id,) = body["reissued_as"]
    assert new_id != held["identifier"]
    stack.cli("send")
    rows = {r["identifier"]: r for r in stack.ledger("ghost")}
    assert (rows[held["identifier"]]["state"], rows[held["identifier"]]["reason"]) == (
        "cancelled",
        "reissued",
    )
    assert rows[new_id]["state"] == "sent"
    summary = stack.stripe.v1.billing.meters.list().data[0]
    totals = stack.stripe.v1.billing.meters.event_summaries.list(
        summary.id, {"customer": real, "start_time": BUCKET, "end_time": BUCKET + HOUR}
    ).data
    assert totals[0].aggregated_value == rows[new_id]["quantity"] == held["quantity"]
