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


@pytest.mark.parametrize(
    "spelling",
    [
        "20260101T100000Z",  # ISO 8601 basic format
        "2026-W01-1T10:00:00Z",  # week date
        "2026-01-01 10:00:00",  # no offset
        "2026-01-01T10:00Z",  # no seconds
        "2026-13-01T10:00:00Z",  # no such month
        "2026-01-01T10:00:00+24:00",  # no such offset
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
