"""Usage events: the canonical (CloudEvents-compatible) form, validation and ingest.

An event is ``{"id", "type", "subject" (the org), "source"?, "time" (RFC 3339) or "ts" (unix
ms), "data"}``. A batch is validated whole; one bad event rejects the batch with every bad
event's index and field, and nothing is stored. Numbers in `data` are decoded as `Decimal`, so
meter values are exact from the wire on. A body's shape is read before it is decoded
(:func:`scan_json`): one nested deeper than MAX_JSON_DEPTH, or holding more events or values
than a batch may, is refused without being decoded, so memory stays a small multiple of it.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from controlplane.capabilities import Keys, Refused
from controlplane.errors import InvalidInput, Problem, Undecodable, UnsupportedMediaType
from controlplane.interfaces import GaugePoint, IngestResult, Storage, StoredEvent
from controlplane.meters import ExpressionError, GaugeReading, MeterSet
from controlplane.times import iso, parse_time
from controlplane.units import to_picos

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
    # a capability token (controlplane.capabilities): its org's plan, signed; a CloudEvents
    # extension attribute
    captoken: Annotated[str, msgspec.Meta(max_length=4096)] | None = None


_batch_decoder = msgspec.json.Decoder(list[EventIn], float_hook=Decimal)
_one_decoder = msgspec.json.Decoder(EventIn, float_hook=Decimal)
_any_decoder = msgspec.json.Decoder(float_hook=Decimal)
_data_encoder = msgspec.json.Encoder(decimal_format="number")

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


class BatchTooLarge(InvalidInput):
    """The batch is larger than one batch may be; refused before it is decoded whole."""


MAX_JSON_DEPTH = 64
"""How deeply JSON bodies may nest. msgspec's decoder recurses once per level, as do the
encoders and the storage plugins reading `data` back: well inside the interpreter's own limit,
every decode and re-encode of an accepted body is safe, wherever it happens."""

VALUES_PER_EVENT = 64
"""JSON values (array elements and object members) a batch may hold per event it may hold
(`server.max_batch_events`), on average. Decoded, a value costs up to about a hundred bytes,
so this bounds a request's memory whatever the body's shape: millions of `{}` or `1.0` inside
one event's `data` are refused as surely as millions of events."""


class JsonShape(NamedTuple):
    """What decoding a body would make, known before decoding it (see :func:`scan_json`)."""

    elements: int  # a top-level array's elements; 1 for any other value
    values: int  # at least as many as its values (array elements, object members, lines)


_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{},')
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes
_CHUNK = 1 << 16  # bounds the pieces a pass over a chunk makes


def scan_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> JsonShape:
    """The shape of the JSON (or NDJSON) in `body`, read without decoding it: a few passes
    in C, linear in its length, over copies no larger than it, so that a body can be refused
    for its shape before it costs memory.

    Raises Undecodable when it nests deeper than `max_depth` or a bracket closes none opened
    (the decoders would recurse, or fail only after decoding what comes before). Other
    malformations are left to the decoder, which names their position. Usable for any body:
    webhooks, flags, OFREP as well as ingest.
    """
    if not 0 < max_depth < 255:
        raise ValueError("max_depth: 1 to 254")
    # escaped backslashes and quotes out first: every '"' left opens or closes a string
    skeleton = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    skeleton = _outside_strings(skeleton.replace(b'""', b""))  # most strings: no [ ] { } ,
    opens = skeleton.count(b"[") + skeleton.count(b"{")
    values = opens + skeleton.count(b",") + body.count(b"\n") + 1
    shallow = bytes(range(max_depth + 1))
    depth = zeros = 0
    for start in range(0, len(skeleton), _CHUNK):  # a chunk at a time: bounded copies
        # A comma ends one element and starts the next: as "][" it takes the depth back to
        # 0 between a top-level array's elements, and nowhere else.
        steps = skeleton[start : start + _CHUNK].replace(b",", b"][").translate(_STEPS)
        running = itertools.accumulate(memoryview(steps).cast("b"), initial=depth)
        try:
            depths = bytes(running)[1:]  # ValueError below 0 (or past 255)
        except ValueError:
            lowest = min(itertools.accumulate(memoryview(steps).cast("b"), initial=depth))
            if lowest >= 0:
                raise _too_deep(max_depth) from None
            raise Undecodable(
                [Problem(field="", message="malformed JSON: a bracket closes none opened")]
            ) from None
        if depths.translate(None, shallow):
            raise _too_deep(max_depth)
        zeros += depths.count(0)
        depth = depths[-1] if depths else depth
    elements = zeros if skeleton[:1] == b"[" else 1
    return JsonShape(elements=elements, values=values)


def _outside_strings(skeleton: bytes) -> bytes:
    """`skeleton` without its strings (the text between a quote and the next)."""
    if b'"' not in skeleton:
        return skeleton
    kept, inside = [], 0
    for start in range(0, len(skeleton), _CHUNK):
        pieces = skeleton[start : start + _CHUNK].split(b'"')
        kept.append(b"".join(pieces[inside::2]))
        inside ^= (len(pieces) - 1) & 1
    return b"".join(kept)


def _too_many_events(max_events: int) -> BatchTooLarge:
    return BatchTooLarge(f"more than {max_events} events: at most {max_events} per batch")


def _too_deep(max_depth: int) -> Undecodable:
    return Undecodable([Problem(field="", message=f"JSON nested deeper than {max_depth} levels")])


def decode_body(body: bytes, content_type: str, max_events: int | None = None) -> list[Any]:
    """The raw events of a request body: a JSON object, a JSON array, or NDJSON.

    Returns EventIn objects where the fast path succeeds, plain objects otherwise (validated
    one by one later, so every bad event is reported). Raises Undecodable (an InvalidInput)
    for a body that is no JSON or nests deeper than MAX_JSON_DEPTH, and BatchTooLarge for one
    of more than `max_events` events or `max_events * VALUES_PER_EVENT` values, found before
    the body is decoded: memory stays a small multiple of the body's size, whatever its shape.
    """
    media = content_type.split(";")[0].strip().lower()
    ndjson = media in NDJSON_TYPES
    if not ndjson and media not in JSON_TYPES and media != "":
        raise UnsupportedMediaType(
            f"unsupported content type {media!r}; use application/json, "
            "application/x-ndjson or application/cloudevents-batch+json"
        )
    shape = scan_json(body)
    if max_events is not None:
        if not ndjson and shape.elements > max_events:
            raise _too_many_events(max_events)
        if shape.values > max_events * VALUES_PER_EVENT:
            raise BatchTooLarge(
                f"more than {max_events * VALUES_PER_EVENT} JSON values: a batch holds at most "
                f"{VALUES_PER_EVENT} per event it may hold ({max_events}), on average; send "
                "smaller batches"
            )
    if ndjson:
        items: list[Any] = []
        for n, line in enumerate(io.BytesIO(body)):  # line by line: no list of every line
            if not line.strip():
                continue
            if max_events is not None and len(items) >= max_events:
                raise _too_many_events(max_events)
            try:
                items.append(_any_decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise Undecodable([Problem(field="", message=f"line {n + 1}: {exc}")]) from None
        return items
    try:
        if body.lstrip()[:1] == b"[":
            try:  # typed: stops at the first element that is no event
                return list(_batch_decoder.decode(body))
            except msgspec.ValidationError:
                # every bad event is reported: decoded again as plain JSON
                return list(_any_decoder.decode(body))
        try:
            return [_one_decoder.decode(body)]
        except msgspec.ValidationError:
            return [_any_decoder.decode(body)]
    except msgspec.DecodeError as exc:
        raise Undecodable([Problem(field="", message=f"malformed JSON: {exc}")]) from None


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
            f"{field}: {iso(at // 1000)} is outside the accepted window, "
            f"{iso(earliest // 1000)} to {iso(latest // 1000)} "
            "([server] event_time_min, event_time_max_ahead_seconds)"
        )
    return at


def parse_time_field(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"time: {exc}") from None


UNMETERED_TYPES_SHOWN = 5  # an ingest answer lists at most this many unmetered types


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
        unknown_types: Literal["accept", "reject"] = "accept",
        clock: Callable[[], float] = time.time,
        tokens: Keys | None = None,
        required_for: Iterable[str] = (),
        enforcing: Callable[[], Awaitable[bool]] | None = None,
        on_untokened: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.storage = storage
        self.tokens = tokens  # verifies capability tokens (None: none are configured)
        self.required_for = frozenset(required_for)  # types that need one, once enforcing
        self.enforcing = enforcing  # whether the control plane is the billing authority now
        self.on_untokened = on_untokened  # (type, refused): an event without a token
        self.unknown_types = unknown_types
        self.meters = meters
        self.bucket_seconds = bucket_seconds
        self.max_events = max_events
        self.earliest = earliest
        self.max_ahead_seconds = max_ahead_seconds
        self.clock = clock

    def window(self) -> tuple[int, int]:
        """The event times accepted now, in unix ms: from `earliest` to a little ahead."""
        return self.earliest * 1000, (int(self.clock()) + self.max_ahead_seconds) * 1000

    def prepare(
        self, items: Sequence[Any], default_source: str, *, enforce: bool = False
    ) -> tuple[list[StoredEvent], int]:
        """Validate a whole batch. Returns the events to store and the in-batch duplicates.
        With `enforce`, an event of a `required_for` type without a valid capability token is
        refused; without, it is accepted and reported (`on_untokened`) as one that would be.

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
        read = self.meters.read
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
            if self.unknown_types == "reject" and event.type not in self.meters.by_type:
                problems.append(Problem(index=index, field="type", message=self._unknown(event)))
                continue
            try:
                values = measure(event.type, event.data)
                points = tuple(_point(r) for r in read(event.type, event.data))
            except ExpressionError as exc:
                problems.append(Problem(index=index, field=exc.path or "data", message=str(exc)))
                continue
            try:
                plan = self._plan(event, time_ms // 1000, enforce)
            except Refused as exc:
                problems.append(Problem(index=index, field="captoken", message=exc.message))
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
                    points=points,
                    plan=plan[0] if plan else None,
                    plan_issued_at=plan[1] if plan else None,
                )
            )
        if problems:
            raise InvalidInput(problems)
        return out, duplicates

    def _plan(self, event: EventIn, at: int, enforce: bool) -> tuple[str, int] | None:
        """The plan (and when it was issued) a valid token on `event` states; None without
        one. Raises Refused for a bad token, and for none on a `required_for` type when
        `enforce` (the control plane is the billing authority)."""
        if event.captoken is None:
            if event.type in self.required_for:
                if self.on_untokened is not None:
                    self.on_untokened(event.type, enforce)
                if enforce:
                    raise Refused(
                        f"events of type {event.type[:100]!r} need a capability token once the "
                        "control plane is the billing authority ([capabilities] required_for)"
                    )
            return None
        if self.tokens is None:
            raise Refused("capability token: none can be verified here (no [[capabilities.keys]])")
        claims = self.tokens.verify(event.captoken, org=event.subject, at=at)
        return claims.plan, claims.issued_at

    def _unknown(self, event: EventIn) -> str:
        known = ", ".join(sorted(self.meters.by_type)) or "none"
        return (
            f"no meter reads events of type {event.type[:100]!r} (meters read: {known}); "
            '[events] unknown_types = "reject" refuses them'
        )

    def unmetered(self, events: Sequence[StoredEvent]) -> dict[str, int]:
        """How many of `events` no meter reads, by type: stored, never billed."""
        counts: dict[str, int] = {}
        for e in events:
            if e.type not in self.meters.by_type:
                counts[e.type] = counts.get(e.type, 0) + 1
        return counts

    async def ingest(self, items: Sequence[Any], default_source: str) -> IngestResult:
        """Validate and store one batch, all or nothing; returns only after commit. The
        answer counts the events no meter reads (`unmetered`), listing their first types."""
        enforce = False
        required = self.required_for and any(_type_of(i) in self.required_for for i in items)
        if required and self.enforcing is not None:
            enforce = await self.enforcing()
        events, in_batch_duplicates = self.prepare(items, default_source, enforce=enforce)
        unmetered = self.unmetered(events)
        if not events:
            return IngestResult(accepted=0, duplicates=in_batch_duplicates)
        stored = await self.storage.insert_events(events, self.bucket_seconds)
        return IngestResult(
            accepted=stored.accepted,
            duplicates=stored.duplicates + in_batch_duplicates,
            unmetered=sum(unmetered.values()),
            unmetered_types=dict(list(unmetered.items())[:UNMETERED_TYPES_SHOWN]),
        )


def _point(reading: GaugeReading) -> GaugePoint:
    value = None if reading.value is None else str(to_picos(reading.value))
    return GaugePoint(
        reading.meter,
        reading.series,
        reading.mode,
        value,
        _data_encoder.encode(reading.fields).decode(),
    )


def _type_of(item: Any) -> Any:
    """An item's `type` before it is validated (an EventIn, or a decoded mapping)."""
    return (
        item.type
        if isinstance(item, EventIn)
        else item.get("type")
        if isinstance(item, dict)
        else None
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
