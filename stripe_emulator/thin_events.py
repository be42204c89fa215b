"""Event destinations, thin (v2) events, and the meter-event error reports they carry.

``POST /v2/core/event_destinations``, ``GET /v2/core/event_destinations[/{id}]``,
``GET /v2/core/events[/{id}]`` (JSON bodies, as the SDK sends v2 requests).

- Destinations (TE-8): ``name``, ``type`` (``webhook_endpoint`` only here), ``event_payload``
  (``thin``; ``snapshot`` is refused: the emulator's snapshot events go to
  ``/v1/webhook_endpoints``), ``enabled_events`` and ``webhook_endpoint.url``. The
  ``whsec_`` signing secret is in a response only when ``include`` names
  ``webhook_endpoint.signing_secret``.
- A meter event that fails a check made asynchronously (``MeterValidation``; see the
  ``meters`` module) is answered 200, counts in no summary (ME-9) and is collected into an error
  report per meter and validation window (``report_window_seconds`` of the emulator clock, its
  start a multiple of it). When a window has ended, one ``v1.billing.meter.error_report_triggered``
  (ME-16; ``related_object`` the meter) per meter, or one ``v1.billing.meter.no_meter_found``
  (ME-17; no ``related_object``) for events naming no meter, is recorded and delivered.
- Delivery (TE-1, TE-10): the thin body (no ``data``) POSTed to each enabled destination
  subscribed to the type, signed like a v1 webhook (``Stripe-Signature: t=...,v1=...``) with
  the destination's secret, through the same queue, retries and faults as v1 webhooks.
- ``GET /v2/core/events/{id}`` (TE-3, TE-4) answers the full event: ``data`` with
  ``developer_message_summary``, ``reason.error_count``, ``reason.error_types[]`` (``code``,
  ``error_count``, up to ``sample_size`` ``sample_errors[]`` of ``{error_message, request:
  {identifier}}``), ``validation_start``/``validation_end`` (ISO-8601); ``changes`` null.
  Events are kept 30 days (TE-7).

Settings (project choices; Stripe documents none of them, see "Not sourced" in
``docs/reference/stripe-behaviour.md``): ``report_window_seconds`` (60), ``sample_size`` (3),
``summary_lag_seconds`` (0: summaries count an event once it is that old on the emulator clock),
and per rule ``sync``/``async`` (default ``async``); at construction, through
:meth:`set_meter_validation`, or ``POST /_emulator/meter_validation``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from stripe_emulator.errors import EmulatedError, Json, invalid, missing, no_such
from stripe_emulator.params import ApiRequest
from stripe_emulator.records import DAY, EventDelivery
from stripe_emulator.state import EmulatorState, MeterValidation

ERROR_REPORT = "v1.billing.meter.error_report_triggered"
NO_METER_FOUND = "v1.billing.meter.no_meter_found"
THIN_EVENT_TYPES = frozenset({ERROR_REPORT, NO_METER_FOUND})
EVENT_RETENTION_SECONDS = 30 * DAY
_DESTINATION_FIELDS = frozenset(
    {
        "name",
        "type",
        "event_payload",
        "enabled_events",
        "webhook_endpoint",
        "include",
        "description",
        "metadata",
        "events_from",
        "snapshot_api_version",
    }
)


@dataclasses.dataclass(slots=True)
class ErrorWindow:
    """Invalid meter events of one meter (None: no meter) in one validation window."""

    meter: str | None
    start: int
    end: int
    samples: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


def iso(ts: float) -> str:
    """A v2 timestamp: ISO-8601 UTC with milliseconds, as Stripe renders them."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ThinEventsMixin(EmulatorState):
    """Event destinations, v2 events and the error reports of asynchronously invalid events."""

    def set_meter_validation(self, **changes: Any) -> MeterValidation:
        """Change the settings of :class:`MeterValidation` (see the module docstring)."""
        known = {f.name for f in dataclasses.fields(MeterValidation)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(
                f"unknown validation settings: {sorted(unknown)}; known: {sorted(known)}"
            )
        settings = dataclasses.replace(self.meter_validation, **changes)
        settings.check()
        self.meter_validation = settings
        return settings

    # -- destinations -----------------------------------------------------------------------

    def create_event_destination(self, request: ApiRequest) -> Json:
        params = request.params
        unknown = sorted(set(params) - _DESTINATION_FIELDS)
        if unknown:
            raise EmulatedError(
                400,
                f"Received unknown parameter: {unknown[0]}",
                param=unknown[0],
                code="parameter_unknown",
            )
        for name in ("name", "type", "event_payload", "enabled_events"):
            if name not in params:
                raise missing(name)
        if params["type"] != "webhook_endpoint":
            raise invalid("type", "The Stripe emulator delivers to webhook_endpoint only.")
        if params["event_payload"] not in ("thin", "snapshot"):
            raise invalid("event_payload", "event_payload must be thin or snapshot.")
        if params["event_payload"] != "thin":
            raise invalid(
                "event_payload",
                "The Stripe emulator sends snapshot events to /v1/webhook_endpoints only.",
            )
        if params.get("snapshot_api_version"):
            raise invalid("snapshot_api_version", "snapshot_api_version is for snapshot events.")
        events = params["enabled_events"]
        if (
            not isinstance(events, list)
            or not events
            or not all(isinstance(e, str) for e in events)
        ):
            raise invalid("enabled_events", "enabled_events must be a list of event types.")
        endpoint = params.get("webhook_endpoint")
        url = endpoint.get("url") if isinstance(endpoint, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise missing("webhook_endpoint.url")
        include = params.get("include") or []
        destination = self.add_event_destination(
            url, events, name=str(params["name"]), description=params.get("description")
        )
        if "webhook_endpoint.signing_secret" not in include:
            destination["webhook_endpoint"]["signing_secret"] = None
        return destination

    def add_event_destination(
        self,
        url: str,
        enabled_events: Sequence[str] = tuple(sorted(THIN_EVENT_TYPES)),
        *,
        name: str = "destination",
        description: str | None = None,
        secret: str | None = None,
    ) -> Json:
        """Register a thin-event destination directly (no HTTP), optionally with a chosen
        secret; returns it with ``webhook_endpoint.signing_secret``."""
        now = iso(self.now())
        ident = self._new_id("ed", 24)
        destination: Json = {
            "id": ident,
            "object": "v2.core.event_destination",
            "amazon_eventbridge": None,
            "azure_event_grid": None,
            "created": now,
            "description": description or "",
            "enabled_events": list(enabled_events),
            "event_payload": "thin",
            "events_from": ["@self"],
            "livemode": False,
            "metadata": {},
            "name": name,
            "snapshot_api_version": None,
            "status": "enabled",
            "status_details": None,
            "type": "webhook_endpoint",
            "updated": now,
            "webhook_endpoint": {"signing_secret": None, "url": url},
        }
        self.event_destinations[ident] = destination
        self._endpoint_secrets[ident] = secret or "whsec_" + self._random_chars(32)
        shown = copy.deepcopy(destination)
        shown["webhook_endpoint"]["signing_secret"] = self._endpoint_secrets[ident]
        return shown

    def retrieve_event_destination(self, request: ApiRequest) -> Json:
        destination = self.event_destinations.get(request.args["id"])
        if destination is None:
            raise no_such("event destination", request.args["id"], "id", status=404)
        return destination

    def list_event_destinations(self, request: ApiRequest) -> Json:
        items = list(reversed(self.event_destinations.values()))
        return {"data": items, "next_page_url": None, "previous_page_url": None}

    def list_v2_events(self, request: ApiRequest) -> Json:
        """``GET /v2/core/events``: newest first, by ``object_id`` (the related object) and
        ``types``, at most ``limit`` (one page)."""
        params = request.params
        oldest = self.now() - EVENT_RETENTION_SECONDS
        items = [e for i, e in reversed(self.v2_events.items()) if self._v2_created[i] >= oldest]
        object_id = params.get("object_id")
        if object_id:
            items = [e for e in items if (e.get("related_object") or {}).get("id") == object_id]
        types = params.get("types")
        if types:
            wanted = types if isinstance(types, list) else [types]
            items = [e for e in items if e["type"] in wanted]
        limit = int(params.get("limit") or 20)
        return {"data": items[:limit], "next_page_url": None, "previous_page_url": None}

    def retrieve_v2_event(self, request: ApiRequest) -> Json:
        ident = request.args["id"]
        event = self.v2_events.get(ident)
        if event is None or self._v2_created[ident] < self.now() - EVENT_RETENTION_SECONDS:
            raise no_such("event", ident, "id", status=404)
        return event

    # -- error reports ----------------------------------------------------------------------

    def _report_invalid(
        self, meter: str | None, code: str, identifier: str, message: str, now: float
    ) -> None:
        """Collect an asynchronously invalid meter event into its window's report."""
        step = self.meter_validation.report_window_seconds
        start = int(now // step * step)
        window = self._error_windows.get((meter, start))
        if window is None:
            window = ErrorWindow(meter, start, start + step)
            self._error_windows[(meter, start)] = window
        window.counts[code] = window.counts.get(code, 0) + 1
        samples = window.samples.setdefault(code, [])
        if len(samples) < self.meter_validation.sample_size:
            samples.append((identifier, message))
        self.counters.meter_events_invalid += 1
        if window.end < self._due_at:
            self._reschedule()

    def _reports_due_at(self) -> float:
        return min((w.end for w in self._error_windows.values()), default=math.inf)

    def _emit_reports(self, now: float) -> None:
        """Record and deliver the report of every window that has ended, oldest first."""
        due = sorted(
            (w for w in self._error_windows.values() if w.end <= now),
            key=lambda w: (w.end, w.meter or ""),
        )
        for window in due:
            del self._error_windows[(window.meter, window.start)]
            self._emit_thin(window)

    def _emit_thin(self, window: ErrorWindow) -> Json:
        kind = NO_METER_FOUND if window.meter is None else ERROR_REPORT
        total = sum(window.counts.values())
        created = iso(window.end)
        ident = "evt_test_" + self._random_chars(24)
        thin: Json = {
            "id": ident,
            "object": "v2.core.event",
            "context": None,
            "created": created,
            "livemode": False,
            "reason": None,
            "type": kind,
        }
        if window.meter is not None:
            thin["related_object"] = {
                "id": window.meter,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{window.meter}",
            }
        noun = "event" if total == 1 else "events"
        verb = "is" if total == 1 else "are"
        full: Json = {
            **thin,
            "changes": None,
            "data": {
                "developer_message_summary": f"There {verb} {total} invalid {noun}",
                "reason": {
                    "error_count": total,
                    "error_types": [
                        {
                            "code": code,
                            "error_count": count,
                            "sample_errors": [
                                {"error_message": message, "request": {"identifier": identifier}}
                                for identifier, message in window.samples.get(code, [])
                            ],
                        }
                        for code, count in window.counts.items()
                    ],
                },
                "validation_end": iso(window.end),
                "validation_start": iso(window.start),
            },
        }
        self.v2_events[ident] = full
        self._v2_created[ident] = float(window.end)
        self.counters.thin_events_emitted += 1
        body = msgspec.json.encode(thin)
        for destination in self.event_destinations.values():
            if destination["status"] == "enabled" and kind in destination["enabled_events"]:
                self._enqueue(EventDelivery(ident, destination["id"], body))
        return full

    def redeliver_thin(self, event_id: str) -> int:
        """Send a thin event again to every enabled destination subscribed to its type."""
        event = self.v2_events.get(event_id)
        if event is None:
            raise no_such("event", event_id, "id", status=404)
        thin = {k: v for k, v in event.items() if k not in ("data", "changes")}
        body = msgspec.json.encode(thin)
        queued = 0
        for destination in self.event_destinations.values():
            if (
                destination["status"] == "enabled"
                and event["type"] in destination["enabled_events"]
            ):
                self._enqueue(EventDelivery(event_id, destination["id"], body, redelivery=True))
                queued += 1
        return queued
