from __future__ import annotations

import json
import tracemalloc
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.errors import InvalidInput, Undecodable
from controlplane.events import (
    MAX_JSON_DEPTH,
    VALUES_PER_EVENT,
    BatchTooLarge,
    EventIn,
    Ingestor,
    bucket_of,
    decode_body,
    scan_json,
)
from controlplane.meters import MeterConfig, MeterSet


def ingestor(max_events: int = 100) -> Ingestor:
    meters = MeterSet([MeterConfig(name="gbs", event_type="tick", value="data.mb / 1024")])
    return Ingestor(storage=None, meters=meters, bucket_seconds=3600, max_events=max_events)  # type: ignore[arg-type]


def test_decode_object_array_ndjson_and_cloudevents_batch() -> None:
    one = b'{"id":"1","type":"tick","subject":"o","ts":1,"data":{"mb":1.5}}'
    assert len(decode_body(one, "application/json")) == 1
    assert (
        len(decode_body(b"[" + one + b"," + one + b"]", "application/cloudevents-batch+json")) == 2
    )
    assert len(decode_body(one + b"\n\n" + one + b"\n", "application/x-ndjson")) == 2
    event = decode_body(one, "application/json")[0]
    assert isinstance(event, EventIn)
    assert event.data["mb"] == Decimal("1.5")  # never a binary float


def test_malformed_json_and_unknown_media_type() -> None:
    with pytest.raises(Undecodable, match="malformed JSON"):
        decode_body(b"{nope", "application/json")
    with pytest.raises(Undecodable, match="line 2"):
        decode_body(b'{"id":"1"}\n{bad', "application/x-ndjson")
    with pytest.raises(Undecodable, match="a bracket closes none opened"):
        decode_body(b"[{}]]" + b",{}" * 100, "application/json")
    with pytest.raises(InvalidInput, match="unsupported content type"):
        decode_body(b"{}", "text/plain")


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("media", ["application/json", "application/x-ndjson"])
def test_json_nested_deeper_than_the_limit_is_undecodable_at_any_depth(media: str) -> None:
    def event(depth: int) -> bytes:  # the event's own object is the first level
        return b'{"id":"a","type":"tick","subject":"o","ts":1,"data":' + nested(depth - 1) + b"}"

    assert len(decode_body(event(MAX_JSON_DEPTH), media)) == 1
    for depth in (MAX_JSON_DEPTH + 1, 1000, 100_000):
        with pytest.raises(Undecodable, match=f"JSON nested deeper than {MAX_JSON_DEPTH} levels"):
            decode_body(event(depth), media)
    with pytest.raises(Undecodable, match="nested deeper"):
        decode_body(b"[" * 300 + b"]" * 300, media)  # past what a byte holds


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _values(value: Any) -> int:
    inner = (
        value
        if isinstance(value, list)
        else list(value.values())
        if isinstance(value, dict)
        else []
    )
    return len(inner) + sum(map(_values, inner))


@settings(max_examples=300, deadline=None)
@given(value=JSON, ascii_only=st.booleans())
def test_the_shape_of_any_json_is_read_without_decoding_it(value: Any, ascii_only: bool) -> None:
    """Strings holding quotes, backslashes, brackets and commas do not count as structure."""
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    limit = 3
    if _depth(value) > limit:
        with pytest.raises(Undecodable, match="nested deeper than 3 levels"):
            scan_json(body, max_depth=limit)
        return
    shape = scan_json(body, max_depth=limit)
    assert shape.elements == (max(len(value), 1) if isinstance(value, list) else 1)
    assert _values(value) <= shape.values <= 2 * _values(value) + 2


def test_oversize_batches_are_refused_before_they_are_decoded() -> None:
    """A batch of too many events, or of an event holding millions of tiny values, is
    refused for its shape: decoding either would take twenty times the body or more."""
    size = 4 * 1024 * 1024
    head = b'{"id":"a","type":"tick","subject":"o","ts":1,"data":{"x":['

    def fill(unit: bytes, room: int) -> bytes:
        return b",".join([unit] * (room // (len(unit) + 1)))

    bodies = {
        "events": b"[" + fill(b"{}", size) + b"]",
        "events, one with a string": b"[" + fill(b"{}", size - 20) + b',{"a":"b"}]',
        "valid events": b"[" + fill(b'{"id":"1","type":"t","subject":"o"}', size) + b"]",
        "values in one event": head + fill(b"{}", size - 100) + b"]}}",
        "decimals in one event": head + fill(b"1.0", size - 100) + b"]}}",
        "NDJSON lines": fill(b"{}\n", size).replace(b",", b""),
    }
    for name, body in bodies.items():
        media = "application/x-ndjson" if "NDJSON" in name else "application/json"
        tracemalloc.start()
        try:
            with pytest.raises(BatchTooLarge):
                decode_body(body, media, 10_000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2.5 * len(body), f"{name}: {peak / len(body):.1f} times the body"


def test_a_batch_may_hold_a_bounded_number_of_values_per_event() -> None:
    event = b'{"id":"a","type":"tick","subject":"o","ts":1,"data":{"x":[%s]}}'
    allowed = ",".join(["1"] * (2 * VALUES_PER_EVENT - 20)).encode()
    assert len(decode_body(event % allowed, "application/json", 2)) == 1
    over = ",".join(["1"] * (2 * VALUES_PER_EVENT)).encode()
    with pytest.raises(BatchTooLarge, match=f"at most {VALUES_PER_EVENT} per event"):
        decode_body(event % over, "application/json", 2)


T = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms


def test_every_bad_event_is_listed_with_index_and_field() -> None:
    items = [
        {"id": "ok", "type": "tick", "subject": "o", "ts": T, "data": {"mb": 1}},
        {"type": "tick", "subject": "o", "ts": T},
        {"id": "x", "type": "tick", "subject": "o"},
        {"id": "y", "type": "tick", "subject": "o", "time": "2026-01-01T00:00:00"},
        {"id": "z", "type": "tick", "subject": "o", "ts": T, "data": {"mb": "many"}},
        {"id": "", "type": "tick", "subject": "o", "ts": T},
    ]
    with pytest.raises(InvalidInput) as err:
        ingestor().prepare(items, "http")
    found = {(p.index, p.field) for p in err.value.problems}
    assert found == {(1, "id"), (2, "time"), (3, "time"), (4, "data.mb"), (5, "id")}
    assert "data.mb is a str" in err.value.problems[3].message


def test_time_and_ts_are_equivalent() -> None:
    events, _ = ingestor().prepare(
        [
            {"id": "a", "type": "other", "subject": "o", "time": "2026-01-01T01:00:00.250Z"},
            {"id": "b", "type": "other", "subject": "o", "time": "2026-01-01T02:00:00+01:00"},
            {"id": "c", "type": "other", "subject": "o", "ts": 1767229200250},
        ],
        "http",
    )
    assert [e.time_ms for e in events] == [1767229200250, 1767229200000, 1767229200250]


def test_both_time_and_ts_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="not both"):
        ingestor().prepare(
            [{"id": "a", "type": "t", "subject": "o", "ts": 1, "time": "2026-01-01T00:00:00Z"}], "x"
        )


def test_duplicates_inside_a_batch_are_counted_once() -> None:
    e = {"id": "a", "type": "tick", "subject": "o", "ts": T, "data": {"mb": 1}}
    events, dupes = ingestor().prepare([e, e, {**e, "source": "other"}], "http")
    assert len(events) == 2 and dupes == 1
    assert {e.source for e in events} == {"http", "other"}


def test_batch_limit() -> None:
    e = {"id": "a", "type": "tick", "subject": "o", "ts": T}
    with pytest.raises(InvalidInput, match="at most 2"):
        ingestor(max_events=2).prepare([e] * 3, "http")


def test_bucket_of() -> None:
    assert bucket_of(7_199_999, 3600) == 3600
    assert bucket_of(7_200_000, 3600) == 7200


def test_rfc_3339_spellings_are_accepted() -> None:
    spellings = ["2026-01-01T10:00:00Z", "2026-01-01t10:00:00z", "2026-01-01T11:00:00.000+01:00"]
    events, _ = ingestor().prepare(
        [{"id": s, "type": "other", "subject": "o", "time": s} for s in spellings], "http"
    )
    assert {e.time_ms for e in events} == {1_767_261_600_000}


@pytest.mark.parametrize(
    "spelling",
    [
        "20260101T100000Z",  # ISO 8601 basic format
        "2026-W01-1T10:00:00Z",  # week date
        "2026-01-01 10:00:00",  # no offset
        "2026-01-01T10:00Z",  # no seconds
        "2026-13-01T10:00:00Z",  # no such month
        "2026-01-01T10:00:00+24:00",  # no such offset
        "\u0662\u0660\u0662\u0666-01-01T10:00:00Z",  # digits, but not ASCII ones
        "2026-01-01T10:00:00.1234567890Z",  # more fraction digits than nanoseconds
    ],
)
def test_time_is_rfc_3339_only(spelling: str) -> None:
    event = {"id": "a", "type": "other", "subject": "o", "time": spelling}
    with pytest.raises(InvalidInput) as err:
        ingestor().prepare([event], "http")
    (problem,) = err.value.problems
    assert (problem.index, problem.field) == (0, "time")


@pytest.mark.parametrize(
    "when",
    [
        {"time": "0001-01-01T00:00:00+14:00"},
        {"time": "1900-06-01T00:00:00Z"},
        {"time": "9999-12-31T23:59:59-14:00"},
        {"ts": -1},
        {"ts": 0},  # 1970: before the window
        {"ts": 253_402_300_799_999},
    ],
)
def test_time_and_ts_share_one_window(when: dict[str, object]) -> None:
    event = {"id": "a", "type": "other", "subject": "o", **when}
    with pytest.raises(InvalidInput) as err:
        ingestor().prepare([event], "http")
    (problem,) = err.value.problems
    assert problem.field in ("time", "ts") and "outside the accepted window" in problem.message


def test_the_window_runs_from_the_configured_start_to_a_little_ahead_of_the_clock() -> None:
    now = 1_767_225_600
    late = Ingestor(
        None,  # type: ignore[arg-type]
        MeterSet([]),
        3600,
        10,
        earliest=now - 3600,
        max_ahead_seconds=60,
        clock=lambda: now,
    )
    ok = [
        {"id": "a", "type": "x", "subject": "o", "ts": (now - 3600) * 1000},
        {"id": "b", "type": "x", "subject": "o", "time": "2026-01-01T00:01:00Z"},
    ]
    assert len(late.prepare(ok, "http")[0]) == 2
    for bad in ({"ts": (now - 3601) * 1000}, {"time": "2026-01-01T00:01:01Z"}):
        with pytest.raises(InvalidInput, match="outside the accepted window"):
            late.prepare([{"id": "c", "type": "x", "subject": "o", **bad}], "http")
