"""Usage events: the canonical (CloudEvents-compatible) form, validation and ingest.

An event is ``{"id", "type", "subject" (the org), "source"?, "time" (RFC 3339) or "ts" (unix
ms), "data"}``. A batch is validated whole; one bad event rejects the batch with every bad
event's index and field, and nothing is stored. Numbers in `data` are decoded as `Decimal`, so
meter values are exact from the wire on.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec

from controlplane.errors import InvalidInput, Problem
from controlplane.interfaces import IngestResult, Storage, StoredEvent
from controlplane.meters import ExpressionError, MeterSet

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]

DEFAULT_SOURCE = "http"
"""The `source` of an event that names none, over HTTP and in a file backfill alike: the same
event id backfilled from a file after it came in live is a duplicate, not a second event."""


class EventIn(msgspec.Struct, frozen=True):
    """An event as it arrives. Unknown CloudEvents attributes are accepted and not stored."""

    id: Text
    type: Text
    subject: Text
    source: Text | None = None
    time: str | None = None
    ts: int | None = None
    data: dict[str, Any] = {}


_batch_decoder = msgspec.json.Decoder(list[EventIn], float_hook=Decimal)
_one_decoder = msgspec.json.Decoder(EventIn, float_hook=Decimal)
_any_decoder = msgspec.json.Decoder(float_hook=Decimal)
_data_encoder = msgspec.json.Encoder(decimal_format="number")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, as far as `time` can say

JSON_TYPES = (
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")


def _field_of(exc: msgspec.ValidationError) -> tuple[str, str]:
    text = str(exc)
    msg, _, at = text.partition(" - at `$")
    field = at.rstrip("`").lstrip(".") if at else ""
    if msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        msg = "required"
    return field, msg


class TooManyEvents(InvalidInput):
    """The batch holds more events than one batch may; refused before it is decoded whole."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"more than {limit} events: at most {limit} per batch")


class _Shell(msgspec.Struct):
    """An event's place in a batch, its fields skipped: counting costs a small object each."""


_shells = msgspec.json.Decoder(list[_Shell])
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{},"))


def _count(body: bytes) -> int | None:
    """How many elements a JSON array holds, counted without decoding them, when it has no
    string (its objects are all `{}`: the cheapest to send and the costliest to decode one by
    one). None when it has strings, or brackets this does not flatten."""
    if b'"' in body:
        return None
    inner = body.translate(None, _NOT_BRACKETS).strip()[1:-1]
    for _ in range(64):
        flat = inner.replace(b"{}", b"").replace(b"[]", b"")
        if flat == inner:
            break
        inner = flat
    if any(c in inner for c in b"[]{}"):
        return None
    return inner.count(b",") + 1 if body.strip()[1:-1].strip() else 0


def decode_body(body: bytes, content_type: str, max_events: int | None = None) -> list[Any]:
    """The raw events of a request body: a JSON object, a JSON array, or NDJSON.

    Returns EventIn objects where the fast path succeeds, plain objects otherwise (validated
    one by one later, so every bad event is reported). Raises InvalidInput on malformed JSON,
    and TooManyEvents for a batch over `max_events`, found before it is decoded whole: memory
    stays a small multiple of the body's size, however many tiny elements it holds.
    """
    media = content_type.split(";")[0].strip().lower()
    if media in NDJSON_TYPES:
        items: list[Any] = []
        for n, line in enumerate(io.BytesIO(body)):  # line by line: no list of every line
            if not line.strip():
                continue
            if max_events is not None and len(items) >= max_events:
                raise TooManyEvents(max_events)
            try:
                items.append(_any_decoder.decode(line))
            except (msgspec.DecodeError, RecursionError) as exc:
                why = "nested too deeply" if isinstance(exc, RecursionError) else exc
                raise InvalidInput([Problem(field="", message=f"line {n + 1}: {why}")]) from None
        return items
    if media not in JSON_TYPES and media != "":
        raise InvalidInput(
            f"unsupported content type {media!r}; use application/json, "
            "application/x-ndjson or application/cloudevents-batch+json"
        )
    stripped = body.lstrip()
    try:
        if stripped[:1] == b"[":
            try:  # typed: stops at the first element that is no event
                events = _batch_decoder.decode(body)
            except msgspec.ValidationError:
                # Every bad event is reported, so the batch is decoded again as plain JSON,
                # once it is known to hold no more events than a batch may (counted as
                # field-less objects: a small multiple of the body, however it is made).
                try:
                    count = _count(stripped)
                    if count is None:
                        count = len(_shells.decode(body))
                except msgspec.ValidationError as exc:  # an element that is no object
                    field, msg = _field_of(exc)
                    raise InvalidInput([Problem(field=field, message=msg)]) from None
                if max_events is not None and count > max_events:
                    raise TooManyEvents(max_events) from None
                return list(_any_decoder.decode(body))
            if max_events is not None and len(events) > max_events:
                raise TooManyEvents(max_events)
            return list(events)
        try:
            return [_one_decoder.decode(body)]
        except msgspec.ValidationError:
            return [_any_decoder.decode(body)]
    except msgspec.DecodeError as exc:
        raise InvalidInput([Problem(field="", message=f"malformed JSON: {exc}")]) from exc
    except RecursionError:
        raise InvalidInput([Problem(field="", message="JSON nested too deeply")]) from None


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_time(text: str) -> int:
    """An RFC 3339 timestamp (`2026-01-01T10:00:00.5Z`, `...+02:00`) as unix milliseconds.
    Raises ValueError for anything else (ISO 8601 variants included: `20260101T100000Z`,
    week dates, no offset)."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp (like 2026-01-01T10:00:00Z): {text[:64]!r}")
    year, month, day, hour, minute, second, fraction, z, sign, oh, om = match.groups()
    if int(oh or 0) > 23 or int(om or 0) > 59:
        raise ValueError(f"not a valid UTC offset: {text[:64]!r}")
    try:
        wall = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError as exc:
        raise ValueError(f"not a valid date and time ({exc}): {text[:64]!r}") from None
    offset = 0 if z else (int(oh) * 60 + int(om)) * 60 * (1 if sign == "+" else -1)
    delta = wall - _EPOCH  # the wall clock read as UTC; integer arithmetic, no float rounding
    seconds = delta.days * 86_400 + delta.seconds - offset
    return seconds * 1000 + int((fraction or "0")[:3].ljust(3, "0"))


def _time_ms(event: EventIn, window: tuple[int, int]) -> int:
    """The event's instant in unix ms, from `time` or `ts`, inside `window` (ms) either way."""
    if event.time is not None and event.ts is not None:
        raise ValueError("time: give either time (RFC 3339) or ts (unix ms), not both")
    if event.ts is not None:
        field, at = "ts", event.ts
    elif event.time is not None:
        field, at = "time", parse_time_field(event.time)
    else:
        raise ValueError("time: required (RFC 3339), or ts in unix milliseconds")
    earliest, latest = window
    if not earliest <= at <= latest:
        raise ValueError(
            f"{field}: {_iso(at)} is outside the accepted window, {_iso(earliest)} to "
            f"{_iso(latest)} ([server] event_time_min, event_time_max_ahead_seconds)"
        )
    return at


def parse_time_field(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"time: {exc}") from None


def _iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms"


class Ingestor:
    """Validates batches and stores them; the one entry point every ingest plugin calls."""

    def __init__(
        self,
        storage: Storage,
        meters: MeterSet,
        bucket_seconds: int,
        max_events: int,
        *,
        earliest: int = 946_684_800,
        max_ahead_seconds: int = 86_400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.meters = meters
        self.bucket_seconds = bucket_seconds
        self.max_events = max_events
        self.earliest = earliest
        self.max_ahead_seconds = max_ahead_seconds
        self.clock = clock

    def window(self) -> tuple[int, int]:
        """The event times accepted now, in unix ms: from `earliest` to a little ahead."""
        return self.earliest * 1000, (int(self.clock()) + self.max_ahead_seconds) * 1000

    def prepare(self, items: Sequence[Any], default_source: str) -> tuple[list[StoredEvent], int]:
        """Validate a whole batch. Returns the events to store and the in-batch duplicates.

        Raises InvalidInput listing every bad event (index, field, why).
        """
        if len(items) > self.max_events:
            raise InvalidInput(
                f"batch has {len(items)} events; at most {self.max_events} are accepted at once"
            )
        problems: list[Problem] = []
        out: list[StoredEvent] = []
        seen: set[tuple[str, str]] = set()
        duplicates = 0
        encode = _data_encoder.encode
        measure = self.meters.measure
        window = self.window()
        for index, item in enumerate(items):
            if isinstance(item, EventIn):
                event = item
            else:
                try:
                    event = msgspec.convert(item, EventIn)
                except msgspec.ValidationError as exc:
                    field, msg = _field_of(exc)
                    problems.append(Problem(index=index, field=field, message=msg))
                    continue
            try:
                time_ms = _time_ms(event, window)
            except ValueError as exc:
                field, _, msg = str(exc).partition(": ")
                problems.append(Problem(index=index, field=field, message=msg))
                continue
            try:
                values = measure(event.type, event.data)
            except ExpressionError as exc:
                problems.append(Problem(index=index, field=exc.path or "data", message=str(exc)))
                continue
            source = event.source or default_source
            key = (source, event.id)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            out.append(
                StoredEvent(
                    source=source,
                    event_id=event.id,
                    type=event.type,
                    org_id=event.subject,
                    time_ms=time_ms,
                    data=encode(event.data),
                    values=values,
                )
            )
        if problems:
            raise InvalidInput(problems)
        return out, duplicates

    async def ingest(self, items: Sequence[Any], default_source: str) -> IngestResult:
        """Validate and store one batch, all or nothing; returns only after commit."""
        events, in_batch_duplicates = self.prepare(items, default_source)
        if not events:
            return IngestResult(accepted=0, duplicates=in_batch_duplicates)
        stored = await self.storage.insert_events(events, self.bucket_seconds)
        return IngestResult(
            accepted=stored.accepted, duplicates=stored.duplicates + in_batch_duplicates
        )


def bucket_of(time_ms: int, bucket_seconds: int) -> int:
    seconds = time_ms // 1000
    return seconds - seconds % bucket_seconds


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
