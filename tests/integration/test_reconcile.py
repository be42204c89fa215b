"""Reconciling the ledger with Stripe's books: the control plane sends usage to the Stripe
emulator over the real SDK, then Stripe's side changes the way people change it (a meter event
cancelled in the dashboard, usage recorded by something else for the same customer), and the
reconciler finds exactly those (org, hour) cells with exact units; a property test holds the
comparison against random drops and extras per customer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient

from controlplane.cli import main
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import ConfigError
from controlplane.flags import FlagChange
from controlplane.http.app import create_app
from controlplane.interfaces import AuditEntry, Finding, RowMove
from controlplane.ledger import LedgerRow, RowState
from controlplane.reconcile import Reconciler, attribute, compare, rows_making_up
from stripe_emulator import StripeEmulator, serve_emulator
from tests.conftest import READ_TOKEN, tick

API_KEY = "sk_test_reconcile"
HOUR = 3600


def settle(stack: Stack) -> None:
    """An hour passes: the calls made so far are older than the settle period."""
    stack.clock[0] += HOUR


class Stack:
    def __init__(self, emulator: StripeEmulator, plane: ControlPlane, clock: list[float]) -> None:
        assert emulator.base_url is not None
        self.emulator, self.plane, self.clock = emulator, plane, clock
        self.http = stripe.HTTPXClient(timeout=5)
        self.stripe = stripe.StripeClient(
            API_KEY,
            base_addresses={"api": emulator.base_url},
            http_client=self.http,
            max_network_retries=0,
        )


@pytest.fixture
async def stack(make_config: Callable[..., Config]) -> AsyncIterator[Stack]:
    emulator = StripeEmulator(seed=17)
    async with serve_emulator(emulator):
        config = make_config(
            billing={
                "backend": "stripe",
                "api_key": API_KEY,
                "api_base": emulator.base_url,
                "rate_limit": 200.0,
                "max_retries": 0,
            },
            reconcile={"settle_seconds": HOUR},
        )
        clock = [time.time()]
        async with ControlPlane(config, clock=lambda: clock[0]) as plane:
            made = Stack(emulator, plane, clock)
            params: Any = {
                "display_name": "GB-seconds",
                "event_name": "memory_gb_seconds",
                "default_aggregation": {"formula": "sum"},
            }
            await made.stripe.v1.billing.meters.create_async(params=params)
            yield made
            await made.http.close_async()  # type: ignore[no-untyped-call]


async def send_usage(stack: Stack, hours: list[int]) -> str:
    """One org's usage in each of `hours` (bucket starts), rolled up and sent: its customer."""
    plane = stack.plane
    customer = str((await stack.stripe.v1.customers.create_async(params={"name": "a"})).id)
    await plane.set_org("o1", customer=customer, plan="pro", actor="t", effective_from=0)
    await plane.ingest([tick(f"e{h}", "o1", h + 5, mb=1024, s=180) for h in hours], "http")
    await plane.rollup(until=max(hours) + HOUR)
    changes = [
        FlagChange("authority", "controlplane"),
        FlagChange("bill_from", min(hours)),
        FlagChange("shadow", False),
    ]
    await plane.set_flags(changes, actor="t", reason="go")
    await plane.send()
    rows = await plane.storage.ledger(state=RowState.SENT)
    assert len(rows) == len(hours) and {r.attempt_timestamp for r in rows} == set(hours)
    return customer


async def test_stripes_changes_are_found_with_their_exact_units(stack: Stack) -> None:
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 5 * HOUR, now - 4 * HOUR, now - 3 * HOUR]
    customer = await send_usage(stack, hours)  # 180 units an hour
    settle(stack)
    clean = await stack.plane.reconciler.run(now - 6 * HOUR, now)
    assert clean.clean and clean.hours == 3 and clean.customers == 1

    rows = {r.bucket_start: r for r in await stack.plane.storage.ledger(state=RowState.SENT)}
    cancel: Any = {
        "event_name": "memory_gb_seconds",
        "type": "cancel",
        "cancel": {"identifier": rows[hours[0]].identifier},
    }
    await stack.stripe.v1.billing.meter_event_adjustments.create_async(params=cancel)  # dashboard
    extra: Any = {
        "event_name": "memory_gb_seconds",
        "payload": {"stripe_customer_id": customer, "value": "7"},
        "timestamp": hours[2] + 60,
        "identifier": "made-elsewhere-1",
    }
    await stack.stripe.v1.billing.meter_events.create_async(params=extra)

    run = await stack.plane.reconciler.run(now - 6 * HOUR, now)
    assert not run.clean
    assert [(f.org_id, f.hour, f.ledger, f.provider, f.status) for f in run.findings] == [
        ("o1", hours[0], 180, 0, "short"),
        ("o1", hours[2], 180, 187, "over"),
    ]
    assert (run.units_short, run.units_over) == (180, 7)
    assert [r.id for r in await stack.plane.reconciler.runs()] == [run.id, clean.id]
    metrics = stack.plane.metrics
    assert metrics.reconcile_short._value.get() == 180
    (alert, *_) = await stack.plane.storage.parity_alerts("job:reconcile:findings", limit=5)
    assert "180 units short" in alert.text and "7 over" in alert.text


async def test_hours_younger_than_the_settle_period_are_not_compared(stack: Stack) -> None:
    now = int(time.time()) // HOUR * HOUR
    await send_usage(stack, [now - HOUR])  # inside the settle hour: not yet comparable
    run = await stack.plane.reconciler.run(now - 3 * HOUR, now + HOUR)
    assert (run.end, run.hours, run.clean) == (now - HOUR, 0, True)  # the settled hours only


async def test_the_api_runs_and_lists_reconciliations(stack: Stack) -> None:
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 4 * HOUR]
    await send_usage(stack, hours)
    settle(stack)
    auth = {"Authorization": f"Bearer {READ_TOKEN}"}
    async with AsyncTestClient(app=create_app(stack.plane.config, cp=stack.plane)) as client:
        bad = await client.get("/v1/reconciliation", params={"from": 5, "to": now}, headers=auth)
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "from"
        # a window before the usage: no customer to read at Stripe (the app's own event loop
        # serves this client, so the run that reads Stripe is the test's, below)
        window = {"from": now - 9 * HOUR, "to": now - 6 * HOUR}
        r = await client.get("/v1/reconciliation", params=window, headers=auth)
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["hours"], r.json()["from"]) == (
            "clean",
            0,
            window["from"],
        )
        found = await stack.plane.reconciler.run(now - 6 * HOUR, now)
        runs = (await client.get("/v1/reconciliation/runs", headers=auth)).json()
        assert [run["id"] for run in runs["runs"]] == [found.id, r.json()["id"]]
        assert runs["runs"][0]["hours"] == 1 and runs["clean_since"] == window["from"]


def test_the_cli_exits_1_on_findings_and_2_on_a_bad_window(
    stack: Stack, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cp.toml"
    config.write_text(f'[storage]\nbackend = "sqlite"\npath = "{tmp_path / "x.db"}"\n')
    assert main(["reconcile", "--from", "5", "--to", "7200", "--config", str(config)]) == 2
    assert "billing plugin cannot read" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.sampled_from(["cus_a", "cus_b"]), st.integers(0, 5)),
        st.tuples(st.integers(0, 50), st.integers(-50, 50)),
        max_size=12,
    )
)
def test_random_drops_and_extras_are_reported_exactly(
    cells: dict[tuple[str, int], tuple[int, int]],
) -> None:
    """Per customer and hour: the ledger sent `sent`; the provider lost or gained `delta`
    (never below 0). Every cell whose totals differ is a finding with exactly that difference,
    and the units short and over add up to the drops and the extras."""
    orgs = {"cus_a": "org_a", "cus_b": "org_b"}
    ledger = {(orgs[c], c, "gbs", h * HOUR): sent for (c, h), (sent, _) in cells.items() if sent}
    provider: dict[tuple[str, str], dict[int, int]] = {}
    for (c, h), (sent, delta) in cells.items():
        held = max(0, sent + delta)
        if held:
            provider.setdefault((c, "gbs"), {})[h * HOUR] = held
    findings, _ = compare(ledger, provider)
    expected = {
        (c, h * HOUR): (sent, max(0, sent + delta))
        for (c, h), (sent, delta) in cells.items()
        if max(0, sent + delta) != sent
    }
    assert {(f.customer, f.hour): (f.ledger, f.provider) for f in findings} == expected
    for f in findings:
        assert f.status == ("short" if f.provider < f.ledger else "over")
        if f.ledger:
            assert f.org_id == orgs[f.customer]


async def test_events_stripe_drops_asynchronously_are_found_short(stack: Stack) -> None:
    """Stripe answers 200 for a customer it does not know and counts the event nowhere (its
    error report samples only a few identifiers): the reconciler finds every such hour."""
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 4 * HOUR, now - 3 * HOUR]
    plane = stack.plane
    await plane.set_org("o2", customer="cus_unknown_here", plan="pro", actor="t", effective_from=0)
    await plane.ingest([tick(f"u{h}", "o2", h + 5, mb=1024, s=180) for h in hours], "http")
    await plane.rollup(until=max(hours) + HOUR)
    changes = [
        FlagChange("authority", "controlplane"),
        FlagChange("bill_from", min(hours)),
        FlagChange("shadow", False),
    ]
    await plane.set_flags(changes, actor="t", reason="go")
    await plane.send()
    settle(stack)
    assert len(await plane.storage.ledger(state=RowState.SENT)) == 2  # Stripe answered 200
    run = await plane.reconciler.run(now - 6 * HOUR, now)
    assert [(f.org_id, f.hour, f.ledger, f.provider, f.status) for f in run.findings] == [
        ("o2", hours[0], 180, 0, "short"),
        ("o2", hours[1], 180, 0, "short"),
    ]


async def test_a_repair_sends_exactly_the_missing_units_once(stack: Stack) -> None:
    """A meter event cancelled in Stripe's dashboard: the run holds that row as
    `provider_missing` (the hour reconciles clean after); a repair re-issues it under a new
    identifier, so Stripe holds the hour's units once more, and a second repair does nothing."""
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 5 * HOUR, now - 4 * HOUR]
    await send_usage(stack, hours)
    settle(stack)
    plane, reconciler = stack.plane, stack.plane.reconciler
    lost = next(r for r in await plane.storage.ledger() if r.bucket_start == hours[0])
    cancel: Any = {
        "event_name": "memory_gb_seconds",
        "type": "cancel",
        "cancel": {"identifier": lost.identifier},
    }
    await stack.stripe.v1.billing.meter_event_adjustments.create_async(params=cancel)

    run = await reconciler.run(now - 6 * HOUR, now)
    (finding,) = run.findings
    assert (finding.status, finding.remedy, finding.rows) == ("short", "held", [lost.identifier])
    held = next(r for r in await plane.storage.ledger() if r.id == lost.id)
    assert (held.state, held.reason, held.quantity) == (RowState.HELD, "provider_missing", 180)
    assert (await reconciler.run(now - 6 * HOUR, now)).clean  # what the ledger says is billed

    preview = await reconciler.repair(apply=False, actor="t")
    assert (preview.applied, preview.reissued, preview.reissued_as) == (
        False,
        [lost.identifier],
        [],
    )
    assert next(r for r in await plane.storage.ledger() if r.id == lost.id).state is RowState.HELD
    done = await reconciler.repair(apply=True, actor="t")
    assert done.reissued == [lost.identifier] and len(done.reissued_as) == 1
    await plane.send()
    settle(stack)
    (again,) = [r for r in await plane.storage.ledger() if r.identifier == done.reissued_as[0]]
    assert (again.state, again.quantity, again.attempt_timestamp) == (RowState.SENT, 180, hours[0])
    after = await reconciler.run(now - 6 * HOUR, now)
    assert after.clean and after.hours == 2
    assert (await reconciler.repair(apply=True, actor="t")).reissued == []
    audit = await plane.storage.audit_log(action_prefix="reconcile.repaired")
    assert len(audit) == 1 and audit[0].after["reissued_as"] == done.reissued_as


async def test_over_at_stripe_is_found_cancelled_again_or_listed(stack: Stack) -> None:
    """Three ways Stripe holds more than the ledger sent: a row the ledger held as ambiguous
    arrived after all (`found`: sent again in the ledger), a row the ledger cancelled is still
    counted (`cancel`: a repair cancels it once), usage recorded by something else (listed
    for a credit note)."""
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 5 * HOUR, now - 4 * HOUR, now - 3 * HOUR]
    customer = await send_usage(stack, hours)
    settle(stack)
    plane, reconciler = stack.plane, stack.plane.reconciler
    rows = {r.bucket_start: r for r in await plane.storage.ledger()}
    timeout = RowMove(
        rows[hours[0]].id,
        "sent",
        None,
        "held",
        "ambiguous",
        "timed out",
        AuditEntry(action="ledger.held", subject=rows[hours[0]].identifier, actor="t"),
    )
    assert await plane.storage.move_rows([timeout], now) == [rows[hours[0]].id]
    await plane.storage.cancel_rows([rows[hours[1]].id], now, "t", "rolled_back")  # not at Stripe
    extra: Any = {
        "event_name": "memory_gb_seconds",
        "payload": {"stripe_customer_id": customer, "value": "7"},
        "timestamp": hours[2] + 60,
        "identifier": "made-elsewhere-2",
    }
    await stack.stripe.v1.billing.meter_events.create_async(params=extra)

    run = await reconciler.run(now - 6 * HOUR, now)
    assert [(f.hour, f.status, f.remedy, f.rows) for f in run.findings] == [
        (hours[0], "over", "found", [rows[hours[0]].identifier]),
        (hours[1], "over", "cancel", [rows[hours[1]].identifier]),
        (hours[2], "over", "credit_note", []),
    ]
    assert next(r for r in await plane.storage.ledger() if r.bucket_start == hours[0]).state == (
        RowState.SENT
    )
    done = await reconciler.repair(apply=True, actor="t")
    assert (done.cancelled, done.not_cancelled) == ([rows[hours[1]].identifier], [])
    assert [(f.hour, f.provider - f.ledger) for f in done.credit_notes] == [(hours[2], 7)]
    assert (await reconciler.repair(apply=True, actor="t")).repaired_before

    after = await reconciler.run(now - 6 * HOUR, now)
    assert [(f.hour, f.remedy) for f in after.findings] == [(hours[2], "credit_note")]
    again = await reconciler.repair(apply=True, actor="t")  # a new run: nothing to cancel
    assert (again.cancelled, again.reissued) == ([], [])


def test_attribution_takes_the_fewest_newest_rows_that_make_up_the_difference() -> None:
    def row(i: int, quantity: int, state: RowState = RowState.SENT) -> LedgerRow:
        return LedgerRow(
            i, f"r{i}", "o", "m", 0, HOUR, i, 0, quantity, state, None, None, 1, 0, None, 0, 0
        )

    rows = [row(1, 5), row(2, 3), row(3, 2), row(4, 5)]
    assert [r.id for r in rows_making_up(rows, 5) or []] == [4]
    assert [r.id for r in rows_making_up(rows, 8) or []] == [2, 4]
    assert rows_making_up(rows, 16) is None and rows_making_up(rows, 0) is None
    short = Finding("o", "c", "m", 0, ledger=15, provider=10, status="short")
    assert attribute(short, rows, now=0, cancel_window=HOUR).rows == ["r4"]
    unattributable = Finding("o", "c", "m", 0, ledger=15, provider=4, status="short")
    assert attribute(unattributable, rows, now=0, cancel_window=HOUR).remedy == "unattributed"
    old = [msgspec.structs.replace(row(5, 4, RowState.CANCELLED), reason="rolled_back")]
    over = Finding("o", "c", "m", 0, ledger=15, provider=19, status="over")
    assert attribute(over, old, now=0, cancel_window=HOUR).remedy == "cancel"
    assert attribute(over, old, now=2 * HOUR, cancel_window=HOUR).remedy == "credit_note"


async def test_with_repair_resend_a_scheduled_pass_resends_what_an_earlier_one_held(
    stack: Stack,
) -> None:
    """`repair = "resend"`: a row held as missing is re-issued by the first scheduled pass at
    least `settle_seconds` after the hold (a run in between would have found it, had Stripe's
    summaries only been late), never by the pass that held it."""
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 5 * HOUR]
    await send_usage(stack, hours)
    settle(stack)
    plane = stack.plane
    (lost,) = await plane.storage.ledger()
    cancel: Any = {
        "event_name": "memory_gb_seconds",
        "type": "cancel",
        "cancel": {"identifier": lost.identifier},
    }
    await stack.stripe.v1.billing.meter_event_adjustments.create_async(params=cancel)
    settings = msgspec.structs.replace(plane.config.reconcile, repair="resend")
    config = msgspec.structs.replace(plane.config, reconcile=settings)
    clock = stack.clock
    reconciler = Reconciler(
        plane.storage, plane.billing, config, now=lambda: int(clock[0]), count=lambda _: None
    )
    first = await reconciler.scheduled()
    assert [f.remedy for f in first.findings] == ["held"]
    assert [r.state for r in await plane.storage.ledger()] == [RowState.HELD]  # not yet
    clock[0] += HOUR
    assert (await reconciler.scheduled()).clean
    states = sorted((r.state, r.reason) for r in await plane.storage.ledger())
    assert states == [(RowState.CANCELLED, "reissued"), (RowState.PENDING, None)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-20, 60), min_size=1, max_size=10),
    st.data(),
)
def test_a_dropped_set_of_rows_is_attributed_to_rows_holding_exactly_its_units(
    quantities: list[int], data: st.DataObject
) -> None:
    """Stripe loses whole events: whichever rows of an hour it dropped, the finding is held
    on rows whose quantities make up exactly the units missing (the fewest such rows), and
    the hour then reconciles clean; nothing is held when nothing is missing."""
    rows = [
        LedgerRow(
            i, f"r{i}", "o", "m", 0, HOUR, i, 0, q, RowState.SENT, None, None, 1, 0, None, 0, 0
        )
        for i, q in enumerate(quantities, start=1)
    ]
    dropped = data.draw(st.sets(st.sampled_from([r.id for r in rows])))
    sent = sum(quantities)
    held = sum(r.quantity for r in rows if r.id not in dropped)
    if held == sent:
        return  # the provider's total matches: no finding to attribute
    status = "short" if held < sent else "over"
    finding = attribute(
        Finding("o", "c", "m", 0, ledger=sent, provider=held, status=status),
        rows,
        now=0,
        cancel_window=HOUR,
    )
    if status == "over":  # negative rows dropped: Stripe holds more, no unsent row explains it
        assert finding.remedy == "credit_note" and finding.rows == []
        return
    assert finding.remedy == "held"
    chosen = [r for r in rows if r.identifier in finding.rows]
    assert sum(r.quantity for r in chosen) == sent - held
    assert len(chosen) <= len([r for r in rows if r.id in dropped and r.quantity])


async def test_a_count_meter_is_billed_every_event_it_counted(stack: Stack) -> None:
    """The product sends one meter event per bucket holding the bucket's count, so the Stripe
    meter it publishes must sum those values: a `count` formula at Stripe would count one per
    bucket, whatever the bucket held (under billing)."""
    plane = stack.plane
    (calls,) = [m for m in plane.config.meters if m.aggregation == "count"]
    params: Any = {
        "display_name": "API calls",
        "event_name": calls.provider_event_name,
        "default_aggregation": {"formula": calls.provider_formula},  # as `catalog publish` does
    }
    await stack.stripe.v1.billing.meters.create_async(params=params)
    now = int(time.time()) // HOUR * HOUR
    hour = now - 3 * HOUR
    customer = str((await stack.stripe.v1.customers.create_async(params={"name": "c"})).id)
    await plane.set_org("o3", customer=customer, plan="pro", actor="t", effective_from=0)
    await plane.ingest(
        [
            {"id": f"c{i}", "type": "call", "subject": "o3", "ts": (hour + i) * 1000, "data": {}}
            for i in range(3)
        ],
        "http",
    )
    await plane.rollup(until=hour + HOUR)
    changes = [
        FlagChange("authority", "controlplane"),
        FlagChange("bill_from", hour),
        FlagChange("shadow", False),
    ]
    await plane.set_flags(changes, actor="t", reason="go")
    await plane.send()
    settle(stack)
    (row,) = await plane.storage.ledger(state=RowState.SENT)
    assert row.quantity == 3
    assert stack.emulator.meter_total(calls.provider_event_name, customer, hour, hour + HOUR) == 3
    assert (await plane.reconciler.run(hour, hour + HOUR)).clean


async def test_publishing_refuses_a_stripe_meter_that_counts_events(
    stack: Stack, make_config: Callable[..., Config]
) -> None:
    """A `count` meter published by an earlier version bills one unit per bucket: publishing
    says so and what to do (a formula cannot change), and publishes nothing."""
    params: Any = {
        "display_name": "API calls",
        "event_name": "calls",
        "default_aggregation": {"formula": "count"},
    }
    await stack.stripe.v1.billing.meters.create_async(params=params)
    catalog = {
        "products": [{"key": "pro", "name": "Pro"}],
        "prices": [
            {"key": "calls", "product": "pro", "lookup_key": "calls_v1", "meter": "calls",
             "unit_amount": "0.01"},
        ],
    }  # fmt: skip
    config = make_config(billing=msgspec.to_builtins(stack.plane.config.billing), catalog=catalog)
    async with ControlPlane(config) as plane:
        with pytest.raises(ConfigError, match=r"meters\.calls: .* aggregates with `count`"):
            await plane.catalog_publish(actor="t")
        assert await plane.storage.catalog_version() is None


async def test_a_cancel_stripe_did_not_apply_is_found_though_no_row_of_its_customer_is_sent(
    stack: Stack,
) -> None:
    """The ledger cancelled every row of a customer (a rollback) but Stripe still counts them:
    the cancelled rows bring their cells into the run, so the units show as over."""
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 5 * HOUR, now - 4 * HOUR]
    await send_usage(stack, hours)
    plane = stack.plane
    ids = [r.id for r in await plane.storage.ledger()]
    assert await plane.storage.cancel_rows(ids, plane.now(), "t", "rolled_back") == 2
    settle(stack)
    run = await plane.reconciler.run(now - 6 * HOUR, now)
    assert [(f.hour, f.ledger, f.provider, f.status, f.remedy) for f in run.findings] == [
        (hours[0], 0, 180, "over", "cancel"),
        (hours[1], 0, 180, "over", "cancel"),
    ]


async def test_cells_called_within_the_settle_period_wait_for_a_later_run(stack: Stack) -> None:
    """Stripe's summaries are eventually consistent: a backlog sent at a cutover is compared
    only once its calls are older than the settle period, whatever the hour it was stamped."""
    now = int(time.time()) // HOUR * HOUR
    hours = [now - 5 * HOUR]
    plane = stack.plane
    await plane.set_org("o2", customer="cus_unknown_here", plan="pro", actor="t", effective_from=0)
    await plane.ingest([tick("u", "o2", hours[0] + 5, mb=1024, s=180)], "http")
    await plane.rollup(until=hours[0] + HOUR)
    changes = [
        FlagChange("authority", "controlplane"),
        FlagChange("bill_from", hours[0]),
        FlagChange("shadow", False),
    ]
    await plane.set_flags(changes, actor="t", reason="go")
    await plane.send()  # Stripe answers 200 and counts it nowhere
    early = await plane.reconciler.run(now - 6 * HOUR, now)
    assert (early.clean, early.hours) == (True, 0)
    assert [r.state for r in await plane.storage.ledger()] == [RowState.SENT]  # nothing held
    settle(stack)
    later = await plane.reconciler.run(now - 6 * HOUR, now)
    assert [(f.hour, f.status, f.remedy) for f in later.findings] == [(hours[0], "short", "held")]


def test_a_restamped_row_is_never_taken_as_missing() -> None:
    """A row whose call was repeated with a later timestamp (its period finalized meanwhile)
    and answered "already exists" is held by Stripe at its first timestamp: the hour it was
    last stamped in looks short, but re-issuing it would bill it twice."""
    row = LedgerRow(1, "o:m:0:1", "o", "m", 0, HOUR, 1, 0, 5, RowState.SENT, None, None, 2, 0,
                    None, 0, 0, attempt_key="o:m:0:1@7200")  # fmt: skip
    short = Finding("o", "c", "m", 7200, ledger=5, provider=0, status="short")
    assert attribute(short, [row], now=0, cancel_window=HOUR).remedy == "unattributed"
