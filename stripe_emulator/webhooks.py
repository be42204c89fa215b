"""Events, webhook endpoints and the delivery of events to them.

``POST /v1/webhook_endpoints``, ``GET /v1/webhook_endpoints``, ``GET``, ``POST`` (update,
``disabled``) and ``DELETE`` ``/v1/webhook_endpoints/{id}``; ``GET /v1/events`` (``type``
with ``*`` wildcards, ``types[]``, ``delivery_success``, ``created``), ``GET /v1/events/{id}``.

- Events: each of these changes is recorded as a v1 ``event`` (``evt_...``, ``api_version``
  ``2026-10-28.endive``, sent to an endpoint created with an older ``api_version`` rendered in
  that version, see ``versions``; ``data.object`` a snapshot, ``data.previous_attributes`` on
  ``*.updated``, ``request.id``/``request.idempotency_key`` of the API call behind it, null for
  test hooks and time passing, ``pending_webhooks`` = endpoints not yet answering 2xx),
  listed newest first and kept 30 days: ``customer.created``, ``product.created/updated``,
  ``price.created/updated``, ``customer.subscription.created/updated/deleted`` (``updated`` at
  each renewal), ``invoice.created``, ``invoice.finalized``, ``billing.credit_grant.created/
  updated``, ``setup_intent.created/succeeded``, ``checkout.session.completed/expired``.
- Webhook endpoints: ``url`` (http or https; loopback allowed, unlike Stripe) and
  ``enabled_events[]`` (types, or ``*``); the ``whsec_...`` ``secret`` is in the create
  response only. Each event is POSTed, as its exact JSON, to every enabled endpoint subscribed
  to its type, by a background task on the serving loop, with ``Content-Type:
  application/json; charset=utf-8`` and ``Stripe-Signature: t=<unix>,v1=<hex>``, the
  HMAC-SHA256 of ``"{t}.{body}"`` keyed with the secret, computed per attempt (see
  :func:`signature_header`; ``t`` is the emulator clock, so after ``advance`` it is in the
  future, which ``stripe.Webhook.construct_event`` accepts). A non-2xx answer, a timeout or a
  connection error is retried with backoff, up to ``max_attempts``; each attempt is logged in
  :attr:`StripeEmulator.deliveries`. Attempts go one at a time, first attempts in event order
  (a slow endpoint delays the others by at most its ``timeout``).

Webhook settings, at construction (``webhooks=WebhookSettings(...)``) or at run time
(:meth:`StripeEmulator.set_webhooks`, ``POST /_emulator/webhooks``): ``max_attempts`` (4),
``retry_base`` (0.05 s of real time, doubling per retry) and ``retry_max`` (2 s), ``timeout``
(5 s per attempt), ``duplicate_rate`` / ``duplicate_next`` (deliver a fraction of events, or
the next N, twice: same event id, separately signed), ``hold`` (queue first attempts instead of
sending them; :meth:`StripeEmulator.release_webhooks` or ``POST /_emulator/webhooks/release``
``{"order": "reverse"|"shuffle"|"fifo"}`` sends what is held, out of order if asked; turning
``hold`` off releases in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import heapq
import hmac
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from stripe_emulator.errors import Json, invalid, missing, no_such, one_of
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    bool_param,
    created_filter,
    list_page,
    metadata_param,
    only_params,
    str_list_param,
    str_param,
)
from stripe_emulator.records import DAY, EventDelivery
from stripe_emulator.state import EmulatorState, WebhookSettings
from stripe_emulator.versions import API_VERSION, check_version, render

EVENT_RETENTION_SECONDS = 30 * DAY
MAX_EVENT_TYPES = 20

_WEBHOOK_ENDPOINT_FIELDS = frozenset(
    {"api_version", "connect", "description", "enabled_events", "metadata", "url"}
)


class EventsMixin(EmulatorState):
    """Events, webhook endpoints and delivery, on the loop serving the app."""

    def create_webhook_endpoint(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _WEBHOOK_ENDPOINT_FIELDS)
        url = _webhook_url(str_param(params, "url", required=True))
        events = str_list_param(params, "enabled_events")
        if not events:
            raise missing("enabled_events")
        _check_event_types(events)
        if bool_param(params, "connect"):
            raise invalid("connect", "The Stripe emulator has no Connect accounts.")
        endpoint = self.add_webhook_endpoint(
            url,
            events,
            description=str_param(params, "description") or None,
            metadata=metadata_param(params) or {},
            api_version=check_version(version)
            if (version := str_param(params, "api_version"))
            else None,
        )
        return endpoint

    def add_webhook_endpoint(
        self,
        url: str,
        enabled_events: Sequence[str] = ("*",),
        *,
        secret: str | None = None,
        description: str | None = None,
        metadata: Json | None = None,
        api_version: str | None = None,
    ) -> Json:
        """Register an endpoint directly (no HTTP), optionally with a chosen signing secret and
        ``api_version`` (events are rendered in it, see ``versions``); returns it with its
        ``secret``, which, as on Stripe, no later read shows."""
        _webhook_url(url)
        if api_version is not None:
            check_version(api_version)
        _check_event_types(list(enabled_events))
        endpoint: Json = {
            "id": self._new_id("we", 24),
            "object": "webhook_endpoint",
            "api_version": api_version,
            "application": None,
            "created": int(self.now()),
            "description": description,
            "enabled_events": list(enabled_events),
            "livemode": False,
            "metadata": metadata or {},
            "status": "enabled",
            "url": url,
        }
        self.webhook_endpoints[endpoint["id"]] = endpoint
        self._endpoint_secrets[endpoint["id"]] = secret or "whsec_" + self._random_chars(32)
        return {**endpoint, "secret": self._endpoint_secrets[endpoint["id"]]}

    def update_webhook_endpoint(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(
            params, frozenset({"url", "enabled_events", "description", "metadata", "disabled"})
        )
        endpoint = self._webhook_endpoint(request.args["id"])
        changes: Json = {}
        if "url" in params:
            changes["url"] = _webhook_url(str_param(params, "url", required=True))
        events = str_list_param(params, "enabled_events")
        if events is not None:
            _check_event_types(events)
            changes["enabled_events"] = events
        if "description" in params:
            changes["description"] = str_param(params, "description") or None
        metadata = metadata_param(params, endpoint["metadata"])
        if metadata is not None:
            changes["metadata"] = metadata
        disabled = bool_param(params, "disabled")
        if disabled is not None:
            changes["status"] = "disabled" if disabled else "enabled"
        endpoint.update(changes)
        return endpoint

    def retrieve_webhook_endpoint(self, request: ApiRequest) -> Json:
        return self._webhook_endpoint(request.args["id"])

    def list_webhook_endpoints(self, request: ApiRequest) -> Json:
        only_params(request.params, LIST_FIELDS)
        items = list(reversed(self.webhook_endpoints.values()))
        return list_page(items, request.params, "/v1/webhook_endpoints")

    def delete_webhook_endpoint(self, request: ApiRequest) -> Json:
        endpoint = self._webhook_endpoint(request.args["id"])
        del self.webhook_endpoints[endpoint["id"]]
        del self._endpoint_secrets[endpoint["id"]]
        for event_id, pending in self._undelivered.items():
            if endpoint["id"] in pending:
                pending.discard(endpoint["id"])
                self.stripe_events[event_id]["pending_webhooks"] = len(pending)
        return {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}

    def retrieve_event(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        event = self.stripe_events.get(ident)
        if event is None or event["created"] < self.now() - EVENT_RETENTION_SECONDS:
            raise no_such("event", ident, "id", status=404)
        return event

    def list_events(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"type", "types", "delivery_success", "created"})
        oldest = self.now() - EVENT_RETENTION_SECONDS
        items = [e for e in reversed(self.stripe_events.values()) if e["created"] >= oldest]
        kind = str_param(params, "type")
        types = str_list_param(params, "types", max_items=MAX_EVENT_TYPES)
        if kind and types:
            raise one_of("type", "types")
        if kind:
            items = [e for e in items if _type_matches(kind, e["type"])]
        if types:
            items = [e for e in items if any(_type_matches(t, e["type"]) for t in types)]
        success = bool_param(params, "delivery_success")
        if success is not None:
            items = [e for e in items if (e["pending_webhooks"] == 0) is success]
        items = created_filter(items, params)
        return list_page(items, params, "/v1/events")

    def _update(
        self, obj: Json, changes: Json, event_type: str, request: ApiRequest | None
    ) -> Json:
        """Apply `changes` to `obj`; if anything changed, emit `event_type` with the previous
        values as ``previous_attributes``."""
        previous = {k: copy.deepcopy(obj.get(k)) for k, v in changes.items() if obj.get(k) != v}
        if not previous:
            return obj
        obj.update(changes)
        if "updated" in obj and "updated" not in changes:
            obj["updated"] = int(self.now())
        self._emit(event_type, obj, request, previous=previous)
        return obj

    def _emit(
        self,
        event_type: str,
        obj: Json,
        request: ApiRequest | None = None,
        *,
        previous: Json | None = None,
    ) -> Json:
        """Record a Stripe ``event`` (a snapshot of `obj`) and queue it for every enabled
        endpoint subscribed to its type."""
        data: Json = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = copy.deepcopy(previous)
        endpoints = [
            e["id"]
            for e in self.webhook_endpoints.values()
            if e["status"] == "enabled" and _subscribed(e["enabled_events"], event_type)
        ]
        event: Json = {
            "id": self._new_id("evt", 24),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(self.now()),
            "data": data,
            "livemode": False,
            "pending_webhooks": len(endpoints),
            "request": {
                "id": request.request_id if request else None,
                "idempotency_key": request.headers.get("idempotency-key") if request else None,
            },
            "type": event_type,
        }
        self.stripe_events[event["id"]] = event
        self.counters.events_emitted += 1
        if endpoints:
            self._undelivered[event["id"]] = set(endpoints)
            for endpoint in endpoints:
                body = self._rendered(event, endpoint)
                self._enqueue(EventDelivery(event["id"], endpoint, body))
                if self._draw_duplicate():
                    self.counters.webhook_duplicates += 1
                    self._enqueue(EventDelivery(event["id"], endpoint, body, duplicate=True))
        return event

    def _rendered(self, event: Json, endpoint: str) -> bytes:
        """The exact JSON `endpoint` is sent: `event` in the endpoint's API version (VER-2)."""
        version = self.webhook_endpoints[endpoint]["api_version"]
        return msgspec.json.encode(render(event, version, self.prices))

    def set_webhooks(self, **changes: Any) -> WebhookSettings:
        """Change webhook settings (the fields of :class:`WebhookSettings`). Turning ``hold``
        off releases what it held, in order."""
        known = {f.name for f in dataclasses.fields(WebhookSettings)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown webhook settings: {sorted(unknown)}; known: {sorted(known)}")
        settings = dataclasses.replace(self.webhook_settings, **changes)
        settings.check()
        self.webhook_settings = settings
        if not settings.hold and self._held:
            self.release_webhooks("fifo")
        return settings

    def release_webhooks(self, order: str = "reverse") -> int:
        """Send the held deliveries now, in ``reverse``, ``shuffle`` or ``fifo`` order; returns
        how many. ``hold`` stays as it is."""
        if order not in ("reverse", "shuffle", "fifo"):
            raise ValueError("order must be reverse, shuffle or fifo")
        held, self._held = self._held, []
        if order == "reverse":
            held.reverse()
        elif order == "shuffle":
            self._webhook_rng.shuffle(held)
        due = time.monotonic()
        for delivery in held:
            self._sequence += 1
            heapq.heappush(self._outbox, (due, self._sequence, delivery))
        self._kick()
        return len(held)

    def redeliver(self, event_id: str, endpoint: str | None = None) -> int:
        """Send an event again (to `endpoint`, else to every enabled endpoint subscribed to its
        type), as the Dashboard's "Resend" does; returns how many deliveries were queued."""
        event = self.stripe_events.get(event_id)
        if event is None:
            raise no_such("event", event_id, "id", status=404)
        if endpoint is not None:
            self._webhook_endpoint(endpoint)
            targets = [endpoint]
        else:
            targets = [
                e["id"]
                for e in self.webhook_endpoints.values()
                if e["status"] == "enabled" and _subscribed(e["enabled_events"], event["type"])
            ]
        for target in targets:
            body = self._rendered(event, target)
            self._enqueue(EventDelivery(event_id, target, body, redelivery=True))
        return len(targets)

    async def wait_for_webhooks(self, max_wait: float = 5.0) -> bool:
        """Wait until no delivery is queued, retrying or in flight (held ones aside); False if
        `max_wait` seconds pass first. Call it on the loop serving the emulator."""
        deadline = time.monotonic() + max_wait
        while self._outbox or self._sending:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _enqueue(self, delivery: EventDelivery, delay: float = 0.0) -> None:
        if self.webhook_settings.hold and delivery.attempts == 0:
            self._held.append(delivery)
            return
        self._sequence += 1
        heapq.heappush(self._outbox, (time.monotonic() + delay, self._sequence, delivery))
        self._kick()

    def _draw_duplicate(self) -> bool:
        settings = self.webhook_settings
        if settings.duplicate_next:
            settings.duplicate_next -= 1
            return True
        return bool(settings.duplicate_rate) and (
            self._webhook_rng.random() < settings.duplicate_rate
        )

    def _kick(self) -> None:
        """Make sure the dispatcher runs on the loop serving the app, from any thread."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or self._loop.is_closed():
            if running is None:
                return  # not served yet: delivered once it is
            self._loop = running  # served by something else (uvicorn): adopt its loop
        if running is self._loop:
            self._ensure_dispatcher()
        else:
            self._loop.call_soon_threadsafe(self._ensure_dispatcher)

    def _ensure_dispatcher(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch())
        self._wake.set()

    async def _attach(self) -> None:
        """Called by serve_emulator once serving: deliveries run on this loop from now on."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._dispatcher = None
        if self._outbox:
            self._ensure_dispatcher()
        self._reschedule()

    async def _detach(self) -> None:
        """Stop delivering (what is queued stays queued) and stop the due-time timer."""
        task, self._dispatcher = self._dispatcher, None
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop = None

    async def _dispatch(self) -> None:
        """Deliver queued attempts in due order, one at a time (a slow endpoint delays the
        others by at most its timeout); failed attempts are queued again with backoff."""
        async with httpx.AsyncClient(trust_env=False) as http:
            while True:
                wake = self._wake
                assert wake is not None
                wake.clear()
                if not self._outbox:
                    await wake.wait()
                    continue
                due, _, delivery = self._outbox[0]
                delay = due - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), delay)
                    continue
                heapq.heappop(self._outbox)
                self._sending += 1
                try:
                    await self._attempt(http, delivery)
                finally:
                    self._sending -= 1

    async def _attempt(self, http: httpx.AsyncClient, delivery: EventDelivery) -> None:
        endpoint = self.webhook_endpoints.get(delivery.endpoint)
        if endpoint is None and delivery.endpoint in self.event_destinations:
            destination = self.event_destinations[delivery.endpoint]
            endpoint = {"url": destination["webhook_endpoint"]["url"], **destination}
        secret = self._endpoint_secrets.get(delivery.endpoint)
        if endpoint is None or secret is None or endpoint["status"] != "enabled":
            return  # deleted or disabled since
        settings = self.webhook_settings
        delivery.attempts += 1
        signed_at = int(self.now())
        event = self.stripe_events.get(delivery.event) or self.v2_events.get(delivery.event, {})
        record: Json = {
            "event": delivery.event,
            "type": event.get("type"),
            "endpoint": delivery.endpoint,
            "url": endpoint["url"],
            "attempt": delivery.attempts,
            "duplicate": delivery.duplicate,
            "redelivery": delivery.redelivery,
            "signed_at": signed_at,
            "at": self.now(),
            "status": None,
            "error": None,
            "response": None,
            "ok": False,
            "will_retry": False,
        }
        self.counters.webhook_attempts += 1
        try:
            response = await http.post(
                endpoint["url"],
                content=delivery.body,
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                    "Cache-Control": "no-cache",
                    "Stripe-Signature": signature_header(delivery.body, secret, signed_at),
                },
                timeout=settings.timeout,
            )
            record["status"] = response.status_code
            record["response"] = response.text[:500]
            record["ok"] = 200 <= response.status_code < 300
        except Exception as exc:  # refused, timed out, bad URL...: a failed attempt
            record["error"] = f"{type(exc).__name__}: {exc}"
        if record["ok"]:
            self.counters.webhooks_delivered += 1
            pending = self._undelivered.get(delivery.event)
            if pending is not None and delivery.endpoint in pending:
                pending.discard(delivery.endpoint)
                event["pending_webhooks"] = len(pending)
        else:
            self.counters.webhook_failures += 1
            if delivery.attempts < settings.max_attempts:
                record["will_retry"] = True
                backoff = settings.retry_base * 2 ** (delivery.attempts - 1)
                self._enqueue(delivery, min(settings.retry_max, backoff))
            else:
                self.counters.webhooks_abandoned += 1
        self.deliveries.append(record)


def signature_header(payload: bytes, secret: str, timestamp: int) -> str:
    """Stripe's ``Stripe-Signature`` value: ``t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{body}">``,
    keyed with the endpoint's ``whsec_...`` secret (what ``stripe.Webhook.construct_event``
    checks)."""
    signed = str(timestamp).encode() + b"." + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid("url", f"Invalid URL: {url}. An endpoint's URL must be http(s)://host/...")
    return url


_EVENT_TYPE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


def _check_event_types(types: list[str]) -> None:
    for index, value in enumerate(types):
        if value != "*" and not _EVENT_TYPE.match(value):
            raise invalid(
                f"enabled_events[{index}]",
                f"Invalid enabled_events[{index}]: '{value}' is not an event type.",
            )


def _subscribed(enabled: list[str], event_type: str) -> bool:
    return "*" in enabled or event_type in enabled


def _type_matches(pattern: str, event_type: str) -> bool:
    """A ``type`` filter of the events list: exact, or with ``*`` wildcards (``invoice.*``)."""
    if "*" not in pattern:
        return pattern == event_type
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.match(regex, event_type) is not None
