"""Billing meters, meter events, their adjustments and summaries.

``POST``/``GET /v1/billing/meters``, ``GET /v1/billing/meters/{id}``, ``POST .../deactivate``
and ``/reactivate``; ``POST /v1/billing/meter_events``; ``POST
/v1/billing/meter_event_adjustments`` (``type=cancel``); ``GET
/v1/billing/meters/{id}/event_summaries``.

- A meter's ``event_name`` is unique among meters; formula ``sum``, ``count`` or ``last``.
- Meter events, answered 400 before anything is recorded (ME-1, ME-2, ME-5, ME-7, ME-8): a
  missing ``event_name`` or ``payload``, a non-string payload value, a value that is not a
  whole number (an integer string, may be negative, at most 15 digits), a ``timestamp`` outside
  the past 35 days to 5 minutes ahead of the emulator clock; and a reused ``identifier``
  (generated when absent, at most 100 characters) within 24 hours: HTTP 400 ``An event already
  exists with identifier {id}.`` with ``Stripe-Should-Retry: false`` (third-party evidence, see
  "Not sourced"). After 24 hours (emulator clock) the identifier is forgotten and an event
  reusing it is accepted and counted again, which is the hazard the control plane's ledger
  guards against.
- No meter for ``event_name`` (``no_meter``), an inactive meter (``archived_meter``), no
  customer key in the payload (``meter_event_no_customer_defined``) and an unknown customer
  (``meter_event_customer_not_found``): by default answered 200 with the event's identifier
  taken, counted in no summary and reported later in a thin event (ME-9, ME-15 to ME-18; see
  :mod:`stripe_emulator.thin_events`). No Stripe source says which of these are checked
  synchronously, so each is configurable (``MeterValidation``: ``sync`` answers 400 with the
  code).
- One concurrent call per customer per meter: a meter event that arrives while another for the
  same (event name, customer) is still being processed gets 429 ``lock_timeout``. Processing
  is atomic, so this can only happen while an injected latency is holding the first one.
- Adjustments cancel an event by identifier only within 24 hours of the emulator receiving it;
  a cancelled event no longer counts in summaries.
- Summaries aggregate non-cancelled events with timestamp in ``[start_time, end_time)`` for one
  customer by the meter's formula; both bounds must be minute-aligned (hour- or day-aligned with
  ``value_grouping_window``). They are eventually consistent (SUM-1): an event counts once it
  was received ``summary_lag_seconds`` ago on the emulator clock (0 by default).
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from datetime import UTC, datetime

from stripe_emulator.errors import EmulatedError, Json, invalid, missing, no_such
from stripe_emulator.params import (
    LIST_FIELDS,
    ApiRequest,
    int_param,
    list_page,
    obj_param,
    only_params,
    str_param,
)
from stripe_emulator.records import DAY, AcceptedEvent, EmulatedMeter
from stripe_emulator.shapes import METER_SHAPE
from stripe_emulator.state import IDENTIFIER_MEMORY_SECONDS, EmulatorState

CANCEL_WINDOW_SECONDS = DAY
MAX_PAST_SECONDS = 35 * DAY
MAX_FUTURE_SECONDS = 300
MAX_IDENTIFIER_LENGTH = 100
MAX_EVENT_NAME_LENGTH = 100
MAX_VALUE_DIGITS = 15

_METER_FIELDS = frozenset(
    {
        "display_name",
        "event_name",
        "default_aggregation",
        "customer_mapping",
        "value_settings",
        "event_time_window",
    }
)
_METER_EVENT_FIELDS = frozenset({"event_name", "payload", "identifier", "timestamp"})
_ADJUSTMENT_FIELDS = frozenset({"event_name", "type", "cancel"})


class MetersMixin(EmulatorState):
    """Meters and the events reported to them."""

    def add_meter(
        self,
        event_name: str,
        *,
        display_name: str | None = None,
        formula: str = "sum",
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        id: str | None = None,
    ) -> Json:
        """Create a meter directly (no HTTP); same rules as ``POST /v1/billing/meters``."""
        if event_name in self._meters_by_event:
            raise EmulatedError(
                400,
                f"A meter with event_name '{event_name}' already exists. An event name can "
                "only be used by one meter.",
                param="event_name",
            )
        if formula not in ("sum", "count", "last"):
            raise invalid(
                "default_aggregation[formula]",
                f"Invalid default_aggregation[formula]: must be one of sum, count or last, "
                f"got '{formula}'.",
            )
        now = int(self.now())
        obj = copy.deepcopy(METER_SHAPE)
        obj.update(
            id=id or self._new_id("mtr", 24),
            created=now,
            updated=now,
            display_name=display_name or event_name,
            event_name=event_name,
            customer_mapping={"event_payload_key": customer_key, "type": "by_id"},
            default_aggregation={"formula": formula},
            value_settings={"event_payload_key": value_key},
        )
        meter = EmulatedMeter(obj, obj["id"], event_name, customer_key, value_key, formula)
        self.meters[meter.id] = meter
        self._meters_by_event[event_name] = meter
        return obj

    def create_meter(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _METER_FIELDS)
        display_name = str_param(params, "display_name", required=True, max_length=250)
        event_name = str_param(
            params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH
        )
        aggregation = obj_param(params, "default_aggregation")
        formula = aggregation.get("formula")
        if not formula:
            raise missing("default_aggregation[formula]")
        mapping = obj_param(params, "customer_mapping")
        values = obj_param(params, "value_settings")
        return self.add_meter(
            event_name,
            display_name=display_name,
            formula=str(formula),
            customer_key=str(mapping.get("event_payload_key") or "stripe_customer_id"),
            value_key=str(values.get("event_payload_key") or "value"),
        )

    def retrieve_meter(self, request: ApiRequest) -> Json:
        return self._meter(request.args["id"]).obj

    def list_meters(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, LIST_FIELDS | {"status"})
        items = [m.obj for m in reversed(self.meters.values())]
        status = str_param(params, "status")
        if status:
            items = [m for m in items if m["status"] == status]
        return list_page(items, params, "/v1/billing/meters")

    def deactivate_meter(self, request: ApiRequest) -> Json:
        meter = self._meter(request.args["id"])
        now = int(self.now())
        meter.obj.update(status="inactive", updated=now)
        meter.obj["status_transitions"] = {"deactivated_at": now}
        return meter.obj

    def reactivate_meter(self, request: ApiRequest) -> Json:
        meter = self._meter(request.args["id"])
        meter.obj.update(status="active", updated=int(self.now()))
        meter.obj["status_transitions"] = {"deactivated_at": None}
        return meter.obj

    def create_meter_event(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _METER_EVENT_FIELDS)
        event_name = str_param(
            params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH
        )
        if "payload" not in params:
            raise missing("payload")
        payload = obj_param(params, "payload")
        for key, value in payload.items():
            if not isinstance(value, str):
                raise invalid(
                    f"payload[{key}]", f"Invalid payload: payload[{key}] must be a string."
                )
        meter = self._meters_by_event.get(event_name)
        now = self.now()
        invalid_as: tuple[str, str] | None = None  # (code, message) of an async failure
        if meter is None or not meter.active:
            code = "no_meter" if meter is None else "archived_meter"
            message = f"No active meter was found that matches the event name '{event_name}'."
            if meter is not None:
                message = f"The meter for event name '{event_name}' is inactive (archived)."
            if not self.meter_validation.is_async(code):
                raise EmulatedError(400, message, param="event_name", code=code)
            invalid_as = (code, message)
        customer = ""
        value = 0
        if meter is not None and invalid_as is None:
            customer = payload.get(meter.customer_key) or ""
            if not customer:
                code = "meter_event_no_customer_defined"
                message = f"Customer mapping key {meter.customer_key} not found in payload."
                if not self.meter_validation.is_async(code):
                    raise EmulatedError(
                        400, message, param=f"payload[{meter.customer_key}]", code=code
                    )
                invalid_as = (code, message)
            elif customer not in self.customers:
                code = "meter_event_customer_not_found"
                message = f"No such customer: '{customer}'"
                if not self.meter_validation.is_async(code):
                    raise EmulatedError(
                        400, message, param=f"payload[{meter.customer_key}]", code=code
                    )
                invalid_as = (code, message)
        if meter is not None:
            value = _event_value(meter, payload)
        timestamp = int_param(params, "timestamp")
        if timestamp is None:
            timestamp = int(now)
        _check_timestamp(timestamp, now)
        identifier = str_param(params, "identifier", max_length=MAX_IDENTIFIER_LENGTH)
        if not identifier:
            identifier = self._new_id("evt", 24)
        self._forget_expired()
        if identifier in self._identifiers:
            self.counters.duplicate_identifier_rejections += 1
            raise EmulatedError(
                400,
                f"An event already exists with identifier {identifier}.",
                param="identifier",
                headers=[("Stripe-Should-Retry", "false")],
            )
        if invalid_as is not None:
            # Accepted (its identifier is taken), never counted, reported in a thin event.
            code, message = invalid_as
            self._identifiers[identifier] = AcceptedEvent(
                identifier,
                meter.id if meter else "",
                event_name,
                customer,
                value,
                timestamp,
                received_at=now,
                invalid=code,
            )
            reported = meter.id if meter is not None and code != "no_meter" else None
            self._report_invalid(reported, code, identifier, message, now)
            return _meter_event_object(now, event_name, identifier, payload, timestamp)
        assert meter is not None
        event = AcceptedEvent(
            identifier, meter.id, event_name, customer, value, timestamp, received_at=now
        )
        self._identifiers[identifier] = event
        self.events.setdefault((meter.id, customer), []).append(event)
        self.counters.meter_events_accepted += 1
        self._acceptances[identifier] = self._acceptances.get(identifier, 0) + 1
        previous = self._last_accepted.get(identifier)
        if previous is not None and now - previous < IDENTIFIER_MEMORY_SECONDS:
            self.counters.accepted_again_within_memory += 1  # an emulator bug if ever > 0
        self._last_accepted[identifier] = now
        if self.log_events:
            self._log_event(event)
        return _meter_event_object(now, event_name, identifier, payload, timestamp)

    def create_meter_event_adjustment(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(params, _ADJUSTMENT_FIELDS)
        event_name = str_param(
            params, "event_name", required=True, max_length=MAX_EVENT_NAME_LENGTH
        )
        kind = str_param(params, "type", required=True)
        if kind != "cancel":
            raise invalid("type", f"Invalid type: must be cancel, got '{kind}'.")
        identifier = obj_param(params, "cancel").get("identifier")
        if not identifier:
            raise missing("cancel[identifier]")
        if not isinstance(identifier, str):
            raise invalid("cancel[identifier]", "Invalid string: cancel[identifier].")
        self._forget_expired()
        event = self._identifiers.get(identifier)
        if event is not None and self.now() - event.received_at >= CANCEL_WINDOW_SECONDS:
            event = None
        if event is None or event.event_name != event_name:
            if identifier in self._acceptances and event is None:
                message = (
                    f"The meter event with identifier {identifier} was received more than 24 "
                    "hours ago. Meter events can only be cancelled within 24 hours of Stripe "
                    "receiving them."
                )
            else:
                message = (
                    f"No meter event with identifier {identifier} was found for event name "
                    f"'{event_name}'."
                )
            raise invalid("cancel[identifier]", message)
        if event.cancelled:
            raise invalid(
                "cancel[identifier]",
                f"The meter event with identifier {identifier} has already been cancelled.",
            )
        event.cancelled = True
        self.counters.meter_events_cancelled += 1
        if self.log_events:
            print(f"[stripe-emulator] meter event cancelled  identifier={identifier}", flush=True)
        return {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": identifier},
            "event_name": event_name,
            "livemode": False,
            "status": "complete",
            "type": "cancel",
        }

    def list_event_summaries(self, request: ApiRequest) -> Json:
        params = request.params
        only_params(
            params, LIST_FIELDS | {"customer", "start_time", "end_time", "value_grouping_window"}
        )
        meter = self._meter(request.args["id"])
        customer = str_param(params, "customer", required=True)
        if customer not in self.customers:
            raise no_such("customer", customer, "customer")
        start = int_param(params, "start_time", required=True)
        end = int_param(params, "end_time", required=True)
        assert start is not None and end is not None
        window = str_param(params, "value_grouping_window")
        step = {"": 60, "hour": 3600, "day": DAY}.get(window)
        if step is None:
            raise invalid(
                "value_grouping_window",
                f"Invalid value_grouping_window: must be hour or day, got '{window}'.",
            )
        unit = {60: "minute", 3600: "hour", DAY: "UTC day"}[step]
        for name, value in (("start_time", start), ("end_time", end)):
            if value % step:
                raise invalid(name, f"{name} must be aligned with {unit} boundaries.")
        if end <= start:
            raise invalid("end_time", "end_time must be after start_time.")
        processed = self.now() - self.meter_validation.summary_lag_seconds
        bounds = [(start, end)] if not window else [(s, s + step) for s in range(start, end, step)]
        items = [
            {
                "id": _summary_id(meter.id, customer, s, e),
                "object": "billing.meter_event_summary",
                "aggregated_value": self._aggregate(meter, customer, s, e, processed),
                "end_time": e,
                "livemode": False,
                "meter": meter.id,
                "start_time": s,
            }
            for s, e in bounds
        ]
        return list_page(items, params, f"/v1/billing/meters/{meter.id}/event_summaries")

    def _log_event(self, event: AcceptedEvent) -> None:
        when = datetime.fromtimestamp(event.timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        again = self._acceptances[event.identifier]
        note = f"  (accepted {again} times: identifier reused after 24 h)" if again > 1 else ""
        print(
            f"[stripe-emulator] meter event accepted  {event.event_name} "
            f"customer={event.customer} value={event.value} at={when} "
            f"identifier={event.identifier}{note}",
            flush=True,
        )


def _meter_event_object(
    now: float, event_name: str, identifier: str, payload: Json, timestamp: int
) -> Json:
    return {
        "object": "billing.meter_event",
        "created": int(now),
        "event_name": event_name,
        "identifier": identifier,
        "livemode": False,
        "payload": payload,
        "timestamp": timestamp,
    }


def _event_value(meter: EmulatedMeter, payload: Json) -> int:
    raw = payload.get(meter.value_key)
    param = f"payload[{meter.value_key}]"
    if raw is None or raw == "":
        if meter.formula == "count":
            return 1
        raise EmulatedError(
            400,
            f"The payload is missing the key '{meter.value_key}' that holds this meter's value.",
            param=param,
            code="meter_event_invalid_value",
        )
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw):
        raise EmulatedError(
            400,
            f"Invalid value '{raw}' for {param}: meter event values must be whole numbers.",
            param=param,
            code="meter_event_invalid_value",
        )
    if len(raw.lstrip("-").lstrip("0")) > MAX_VALUE_DIGITS:
        raise EmulatedError(
            400,
            f"Invalid value for {param}: at most {MAX_VALUE_DIGITS} significant digits.",
            param=param,
            code="meter_event_value_too_many_digits",
        )
    return int(raw)


def _check_timestamp(timestamp: int, now: float) -> None:
    oldest = math.ceil(now) - MAX_PAST_SECONDS
    newest = int(now) + MAX_FUTURE_SECONDS
    if timestamp < oldest:
        raise EmulatedError(
            400,
            "The event timestamp cannot be more than 35 days in past. Expected a timestamp "
            f"greater than or equal to {oldest}.",
            param="timestamp",
            code="timestamp_too_far_in_past",
        )
    if timestamp > newest:
        raise EmulatedError(
            400,
            "The event timestamp cannot be more than 5 minutes in the future. Expected a "
            f"timestamp less than or equal to {newest}.",
            param="timestamp",
            code="timestamp_in_future",
        )


def _summary_id(meter: str, customer: str, start: int, end: int) -> str:
    digest = hashlib.blake2b(f"{meter}|{customer}|{start}|{end}".encode(), digest_size=12)
    return "mtrusg_" + digest.hexdigest()
