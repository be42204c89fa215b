"""The emulator's own records: accepted meter events, meters, subscriptions' billing cycles,
queued webhook deliveries, HTTP replies and saved idempotent responses, counters."""

from __future__ import annotations

import calendar
import dataclasses
from datetime import UTC, datetime

import msgspec

from stripe_emulator.errors import EmulatedError, Json

DAY = 86_400


@dataclasses.dataclass(slots=True)
class Counters:
    """What happened, for assertions (``GET /_emulator/state``)."""

    requests: int = 0
    meter_events_accepted: int = 0
    meter_events_cancelled: int = 0
    duplicate_identifier_rejections: int = 0
    idempotent_replays: int = 0
    idempotency_errors: int = 0
    rate_limited: int = 0
    lock_timeouts: int = 0
    injected_failures: int = 0
    failures_after_write: int = 0
    dropped_connections: int = 0
    accepted_again_within_memory: int = 0  # must stay 0: Stripe's own guarantee
    events_emitted: int = 0
    webhook_attempts: int = 0
    webhooks_delivered: int = 0  # attempts answered 2xx
    webhook_failures: int = 0  # attempts answered otherwise or not at all
    webhooks_abandoned: int = 0  # deliveries that used up max_attempts
    webhook_duplicates: int = 0  # extra deliveries injected by duplicate_rate/_next
    meter_events_invalid: int = 0  # answered 200, failed a check made asynchronously
    thin_events_emitted: int = 0


@dataclasses.dataclass(slots=True)
class EmulatedMeter:
    """A billing meter: its Stripe object and the fields its events are read by."""

    obj: Json
    id: str
    event_name: str
    customer_key: str
    value_key: str
    formula: str

    @property
    def active(self) -> bool:
        return bool(self.obj["status"] == "active")


@dataclasses.dataclass(slots=True)
class AcceptedEvent:
    """A meter event the emulator accepted (and counts unless cancelled)."""

    identifier: str
    meter_id: str
    event_name: str
    customer: str
    value: int
    timestamp: int
    received_at: float
    cancelled: bool = False
    invalid: str | None = None  # the error-report code of an event that failed async checks


@dataclasses.dataclass(slots=True)
class SubscriptionState:
    """A subscription and its billing cycle: period k is [anchor + k, anchor + k + 1) intervals."""

    obj: Json
    anchor: int
    interval: str
    interval_count: int
    period: int = 0

    def bounds(self) -> tuple[int, int]:
        step = self.interval_count
        return (
            add_interval(self.anchor, self.interval, self.period * step),
            add_interval(self.anchor, self.interval, (self.period + 1) * step),
        )

    @property
    def active(self) -> bool:
        """Not ended (``canceled`` and ``incomplete_expired`` are terminal)."""
        return self.obj["status"] not in ("canceled", "incomplete_expired")

    @property
    def cycling(self) -> bool:
        """Renews at each period end: ``incomplete`` ones wait for their first payment (SUB-3)
        and ``unpaid`` ones keep making invoices (SUB-7)."""
        return self.obj["status"] in ("active", "trialing", "past_due", "unpaid")


@dataclasses.dataclass(slots=True)
class EventDelivery:
    """One event queued for one webhook endpoint; ``body`` is the exact JSON that is signed."""

    event: str
    endpoint: str
    body: bytes
    attempts: int = 0
    duplicate: bool = False
    redelivery: bool = False


@dataclasses.dataclass(slots=True)
class Reply:
    """An HTTP response; ``drop`` cuts the connection after the headers."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    drop: bool = False


@dataclasses.dataclass(slots=True)
class SavedResponse:
    """The first response to an idempotency key, replayed for the same request."""

    method: str
    path: str
    params: Json
    reply: Reply
    request_id: str
    saved_at: float


def json_reply(status: int, obj: Json, request_id: str) -> Reply:
    body = msgspec.json.encode(obj)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if request_id:
        headers.append((b"request-id", request_id.encode()))
    return Reply(status, body, headers)


def error_reply(exc: EmulatedError, request_id: str) -> Reply:
    reply = json_reply(exc.status, exc.body(), request_id)
    reply.headers.extend((k.lower().encode(), v.encode()) for k, v in exc.headers)
    return reply


def add_interval(ts: int, interval: str, count: int) -> int:
    """`ts` plus `count` intervals; months and years keep the day of month, clamped to the
    month's last day (Jan 31 + 1 month = Feb 28), as Stripe's billing cycles do."""
    if interval == "day":
        return ts + count * DAY
    if interval == "week":
        return ts + count * 7 * DAY
    months = count * (12 if interval == "year" else 1)
    start = datetime.fromtimestamp(ts, UTC)
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())
