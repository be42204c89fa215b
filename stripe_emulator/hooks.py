"""The test hooks under ``/_emulator/``: drive the clock, faults, checkout, billing and
webhooks from outside the process.

Test hooks, without auth (JSON bodies; errors are ``{"error": {...}}`` with a 4xx):

- ``GET /_emulator/state``: counters, see :meth:`StripeEmulator.state`, and the serving
  process's ``pid``; ``?identifiers=1`` adds every identifier's acceptance count.
- ``POST /_emulator/clock`` ``{"advance": seconds}``: what falls due on the way happens
  (period ends, automatic finalizations, session expiries).
- ``POST /_emulator/faults``, ``POST /_emulator/reset``.
- ``POST /_emulator/checkout/{id}/complete`` ``{"email"?, "name"?, "payment_method"?}``: the
  customer finishes the session with a test card (default ``pm_card_visa``; a card of the
  decline family is refused with 402); answers the session. ``GET /_emulator/checkout/{id}``
  (the session's ``url``) does the same and redirects (303) to ``success_url`` with
  ``{CHECKOUT_SESSION_ID}`` filled in.
- ``POST /_emulator/subscriptions/{id}/advance`` ``{"at": "period_end"|"now"}``: close the
  current period, by moving the clock to its end (default) or by ending it now and restarting
  the cycle there; answers ``{"invoice", "subscription", "now"}``.
- ``POST /_emulator/invoices/{id}/finalize``; ``POST /_emulator/billing``
  ``{"invoice_finalize_delay": seconds|null, "payment_retry_days": [days...],
  "failed_subscription": "canceled"|"unpaid"}`` (each optional; see ``collection``).
- ``GET``/``POST /_emulator/webhooks`` (settings), ``POST /_emulator/webhooks/release``,
  ``POST /_emulator/webhooks/flush`` ``{"timeout": s}`` (wait until nothing is queued or in
  flight; answers ``{"idle", "pending"}``), ``POST /_emulator/events/{id}/redeliver``
  ``{"endpoint"?}``, ``GET /_emulator/deliveries?event=&endpoint=&type=`` (the attempt log:
  ``event``, ``type``, ``endpoint``, ``url``, ``attempt``, ``status``, ``error``, ``ok``,
  ``will_retry``, ``duplicate``, ``redelivery``, ``signed_at``, ``at``, ``response``; plus
  ``pending`` and ``held``), ``POST /_emulator/webhook_endpoints`` ``{"url", "enabled_events",
  "secret"?, "api_version"?}`` (register with a chosen secret, e.g. the one in a config file).
- ``GET``/``POST /_emulator/meter_validation`` (which meter-event checks are ``sync`` or
  ``async``, ``report_window_seconds``, ``sample_size``, ``summary_lag_seconds``),
  ``POST /_emulator/event_destinations`` ``{"url", "enabled_events"?, "secret"?}`` (a thin-event
  destination with a chosen secret); ``POST /_emulator/events/{id}/redeliver`` also resends a
  thin event.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import msgspec

from stripe_emulator.errors import EmulatedError, Json
from stripe_emulator.records import Reply, json_reply
from stripe_emulator.thin_events import THIN_EVENT_TYPES

if TYPE_CHECKING:
    from stripe_emulator.app import StripeEmulator


_DELIVERY_FILTERS = frozenset({"event", "endpoint", "type", "ok"})
_HOOK_PATH = re.compile(
    r"^/_emulator/(?P<kind>checkout|subscriptions|invoices|events)/(?P<id>[^/]+)"
    r"(?:/(?P<action>[a-z_]+))?$"
)


async def handle(
    emulator: StripeEmulator, method: str, path: str, query: str, body: bytes
) -> Reply:
    """Answer one ``/_emulator/...`` request (JSON in and out; no auth)."""
    try:
        data: Json = msgspec.json.decode(body) if body.strip() else {}
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        emulator.catch_up()
        if (method, path) == ("GET", "/_emulator/state"):
            flags = dict(parse_qsl(query))
            wanted = flags.get("identifiers", "").lower() in ("1", "true", "yes")
            # `pid`: which process answers (a launcher tells its own emulator from another's)
            state = {**emulator.state(identifiers=wanted), "pid": os.getpid()}
            return json_reply(200, state, "")
        if (method, path) == ("POST", "/_emulator/clock"):
            emulator.advance(float(data.get("advance", 0)))
            return json_reply(200, {"now": emulator.now(), "offset": emulator.clock_offset}, "")
        if (method, path) == ("POST", "/_emulator/faults"):
            faults = emulator.set_faults(**data)
            return json_reply(200, dataclasses.asdict(faults), "")
        if (method, path) == ("POST", "/_emulator/reset"):
            emulator.reset()
            return json_reply(200, {"reset": True}, "")
        if (method, path) == ("GET", "/_emulator/webhooks"):
            return json_reply(200, dataclasses.asdict(emulator.webhook_settings), "")
        if (method, path) == ("POST", "/_emulator/webhooks"):
            settings = emulator.set_webhooks(**data)
            return json_reply(200, dataclasses.asdict(settings), "")
        if (method, path) == ("POST", "/_emulator/webhooks/release"):
            released = emulator.release_webhooks(str(data.get("order", "reverse")))
            return json_reply(200, {"released": released}, "")
        if (method, path) == ("POST", "/_emulator/webhooks/flush"):
            idle = await emulator.wait_for_webhooks(float(data.get("timeout", 5.0)))
            pending = emulator.webhooks_pending
            return json_reply(200, {"idle": idle, "pending": pending}, "")
        if (method, path) == ("POST", "/_emulator/webhook_endpoints"):
            events = data.get("enabled_events", ["*"])
            if not isinstance(events, list):
                raise ValueError("enabled_events must be a list of event types")
            version = data.get("api_version")
            endpoint = emulator.add_webhook_endpoint(
                str(data["url"]),
                [str(e) for e in events],
                secret=data.get("secret"),
                api_version=None if version is None else str(version),
            )
            return json_reply(200, endpoint, "")
        if (method, path) == ("GET", "/_emulator/meter_validation"):
            return json_reply(200, dataclasses.asdict(emulator.meter_validation), "")
        if (method, path) == ("POST", "/_emulator/meter_validation"):
            validation = emulator.set_meter_validation(**data)
            return json_reply(200, dataclasses.asdict(validation), "")
        if (method, path) == ("POST", "/_emulator/event_destinations"):
            types = data.get("enabled_events", sorted(THIN_EVENT_TYPES))
            if not isinstance(types, list):
                raise ValueError("enabled_events must be a list of event types")
            destination = emulator.add_event_destination(
                str(data["url"]), [str(t) for t in types], secret=data.get("secret")
            )
            return json_reply(200, destination, "")
        if (method, path) == ("GET", "/_emulator/deliveries"):
            flags = dict(parse_qsl(query))
            records = [
                r
                for r in emulator.deliveries
                if all(str(r.get(k)) == v for k, v in flags.items() if k in _DELIVERY_FILTERS)
            ]
            return json_reply(
                200,
                {
                    "data": records,
                    "pending": emulator.webhooks_pending,
                    "held": emulator.webhooks_held,
                },
                "",
            )
        if (method, path) == ("POST", "/_emulator/billing"):
            collection = emulator.set_collection(
                payment_retry_days=data.get("payment_retry_days"),
                failed_subscription=data.get("failed_subscription"),
            )
            if "invoice_finalize_delay" in data:
                delay = data["invoice_finalize_delay"]
                if delay is not None and float(delay) < 0:
                    raise ValueError("invoice_finalize_delay must not be negative")
                emulator.invoice_finalize_delay = None if delay is None else float(delay)
            return json_reply(
                200, {"invoice_finalize_delay": emulator.invoice_finalize_delay, **collection}, ""
            )
        match = _HOOK_PATH.match(path)
        if match is not None:
            kind, ident, action = match.group("kind", "id", "action")
            if (method, kind, action) == ("POST", "checkout", "complete"):
                session = emulator.complete_checkout(
                    ident,
                    email=data.get("email"),
                    name=data.get("name"),
                    payment_method=str(data.get("payment_method", "pm_card_visa")),
                )
                return json_reply(200, session, "")
            if (method, kind, action) == ("GET", "checkout", None):
                return _checkout_page(emulator, ident)
            if (method, kind, action) == ("POST", "subscriptions", "advance"):
                invoice = emulator.close_period(ident, at=str(data.get("at", "period_end")))
                subscription = emulator.subscriptions[ident].obj
                return json_reply(
                    200,
                    {"invoice": invoice, "subscription": subscription, "now": emulator.now()},
                    "",
                )
            if (method, kind, action) == ("POST", "invoices", "finalize"):
                return json_reply(200, emulator.finalize_invoice(ident), "")
            if (method, kind, action) == ("POST", "events", "redeliver"):
                if ident in emulator.v2_events:
                    return json_reply(200, {"queued": emulator.redeliver_thin(ident)}, "")
                target = data.get("endpoint")
                queued = emulator.redeliver(ident, None if target is None else str(target))
                return json_reply(200, {"queued": queued}, "")
    except EmulatedError as exc:
        return json_reply(exc.status, exc.body(), "")
    except (ValueError, TypeError, KeyError, msgspec.DecodeError) as exc:
        return json_reply(400, {"error": {"type": "emulator_error", "message": str(exc)}}, "")
    return json_reply(
        404, {"error": {"type": "emulator_error", "message": f"no hook {method} {path}"}}, ""
    )


def _checkout_page(emulator: StripeEmulator, session_id: str) -> Reply:
    """The session's ``url``: visiting it completes the session, as a customer would, then
    redirects to ``success_url`` (``{CHECKOUT_SESSION_ID}`` filled in) if there is one."""
    session = emulator._checkout_session(session_id)
    if session["status"] == "open":
        emulator.complete_checkout(session_id)
    target = session["success_url"]
    if not target:
        return json_reply(200, session, "")
    location = target.replace("{CHECKOUT_SESSION_ID}", session_id).encode()
    return Reply(303, b"", [(b"location", location), (b"content-length", b"0")])
