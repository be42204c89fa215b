from __future__ import annotations

from decimal import Decimal

import pytest

from controlplane.errors import InvalidInput
from controlplane.events import EventIn, Ingestor, bucket_of, decode_body
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
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_body(b"{nope", "application/json")
    with pytest.raises(InvalidInput, match="line 2"):
        decode_body(b'{"id":"1"}\n{bad', "application/x-ndjson")
    with pytest.raises(InvalidInput, match="unsupported content type"):
        decode_body(b"{}", "text/plain")


def test_every_bad_event_is_listed_with_index_and_field() -> None:
    items = [
        {"id": "ok", "type": "tick", "subject": "o", "ts": 0, "data": {"mb": 1}},
        {"type": "tick", "subject": "o", "ts": 0},
        {"id": "x", "type": "tick", "subject": "o"},
        {"id": "y", "type": "tick", "subject": "o", "time": "2026-01-01T00:00:00"},
        {"id": "z", "type": "tick", "subject": "o", "ts": 0, "data": {"mb": "many"}},
        {"id": "", "type": "tick", "subject": "o", "ts": 0},
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
    e = {"id": "a", "type": "tick", "subject": "o", "ts": 0, "data": {"mb": 1}}
    events, dupes = ingestor().prepare([e, e, {**e, "source": "other"}], "http")
    assert len(events) == 2 and dupes == 1
    assert {e.source for e in events} == {"http", "other"}


def test_batch_limit() -> None:
    e = {"id": "a", "type": "tick", "subject": "o", "ts": 0}
    with pytest.raises(InvalidInput, match="at most 2"):
        ingestor(max_events=2).prepare([e] * 3, "http")


def test_bucket_of() -> None:
    assert bucket_of(7_199_999, 3600) == 3600
    assert bucket_of(7_200_000, 3600) == 7200
