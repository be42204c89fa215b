"""The Redis Streams ingest plugin against a real redis-server, into a real ControlPlane on the
test storage (SQLite by default), as `serve` starts it (see plugins/ingest/redis_streams.py for
the semantics under test)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.datastructures import State
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from controlplane import config as config_mod
from controlplane.config import Config
from controlplane.core import ControlPlane
from controlplane.errors import ConfigError, StorageError
from controlplane.http.app import create_app
from controlplane.http.controllers.health import readiness
from controlplane.interfaces import IngestResult, StoredEvent
from controlplane.plugins.ingest.redis_streams import RedisStreamsIngest, RedisStreamsIngestConfig
from controlplane.scrape import exposition, scrape
from tests.conftest import HOUR, T0, TOKEN, free_port, raw_config, tick, token_hash

GROUP = "controlplane"
MICROS_PER_TICK = 20_000_000  # tick(): 1024 MB for 20 s = 20 GB-seconds


def section(url: str, stream: str, **overrides: Any) -> dict[str, Any]:
    """An `[[ingest]]` table with fast timings for tests."""
    return {
        "backend": "redis_streams",
        "url": url,
        "stream": stream,
        "block_ms": 100,
        "retry_base_seconds": 0.01,
        "retry_cap_seconds": 0.05,
        **overrides,
    }


def entry(event: Any) -> dict[str, bytes]:
    return {"event": json.dumps(event).encode()}


def ev(event_id: str, offset: int = 0, **extra: Any) -> dict[str, Any]:
    """A tick of its own org, named after the event: usage per org tells which were stored."""
    return tick(event_id, event_id, T0 + offset, **extra)


async def stored(plane: ControlPlane) -> dict[str, int]:
    """Usage per org (= per event, see `ev`) in micro-units, as storage computes it."""
    return await plane.storage.usage_by_org("gbs", T0, T0 + HOUR)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def stream() -> str:
    return f"usage-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


Start = Callable[..., Awaitable[tuple[ControlPlane, list[RedisStreamsIngest]]]]


@pytest.fixture
async def start(
    make_config: Callable[..., Config], redis_url: str, stream: str
) -> AsyncIterator[Start]:
    """Start a ControlPlane whose `[[ingest]]` tables are `sections` (default: one consumer
    of `stream`), and its sources, as `serve` does."""
    planes: list[ControlPlane] = []

    async def go(
        *sections: dict[str, Any], patch: Callable[[ControlPlane], None] | None = None
    ) -> tuple[ControlPlane, list[RedisStreamsIngest]]:
        config = make_config(ingest=list(sections) or [section(redis_url, stream)])
        plane = ControlPlane(config)
        await plane.start()
        planes.append(plane)
        if patch is not None:
            patch(plane)
        sources = await plane.start_ingest()
        assert all(isinstance(s, RedisStreamsIngest) for s in sources)
        return plane, sources  # type: ignore[return-value]

    yield go
    for plane in planes:
        await plane.close()


async def pending(r: Any, stream: str) -> int:
    return int((await r.xpending(stream, GROUP))["pending"])


async def lag(r: Any, stream: str) -> int:
    """Entries of the stream not yet delivered to the group."""
    [info] = await r.xinfo_groups(stream)
    return int(info["lag"])


# delivery -------------------------------------------------------------------------------


async def test_events_are_stored_exactly_once_and_acknowledged(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    for i in range(25):
        await r.xadd(stream, entry(ev(f"e{i:02d}", i)))
    await r.xadd(stream, entry([ev(f"a{i}") for i in range(3)]))  # an array entry
    await r.xadd(stream, entry(ev("e00")))  # a redelivered event: a duplicate

    plane, [source] = await start(section(redis_url, stream, batch_size=10))

    async def done() -> bool:
        return source.stats.entries == 27 and await pending(r, stream) == 0

    await eventually(done)
    ids = [f"e{i:02d}" for i in range(25)] + ["a0", "a1", "a2"]
    assert await stored(plane) == {i: MICROS_PER_TICK for i in ids}  # each once, exactly
    assert (source.stats.accepted, source.stats.duplicates) == (28, 1)
    assert await lag(r, stream) == 0

    # A second consumer of the same group finds nothing left to deliver.
    _, [second] = await start(section(redis_url, stream, consumer="second"))
    await asyncio.sleep(0.3)
    assert second.stats.entries == 0
    assert len(await stored(plane)) == 28


async def test_two_consumers_of_one_group_share_the_stream_exactly_once(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    plane, sources = await start(
        section(redis_url, stream, consumer="one", batch_size=7),
        section(redis_url, stream, consumer="two", batch_size=7),
    )
    async with r.pipeline(transaction=False) as pipe:
        for i in range(300):
            pipe.xadd(stream, entry(ev(f"e{i:03d}", i)))
        await pipe.execute()

    async def done() -> bool:
        return sum(s.stats.entries for s in sources) == 300 and await pending(r, stream) == 0

    await eventually(done)
    assert await stored(plane) == {f"e{i:03d}": MICROS_PER_TICK for i in range(300)}
    assert sum(s.stats.accepted for s in sources) == 300
    assert sum(s.stats.duplicates for s in sources) == 0


# storage failure: nothing acknowledged, back-pressure, recovery ------------------------------


async def test_storage_failure_leaves_entries_pending_until_they_are_committed(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    for i in range(5):
        await r.xadd(stream, entry(ev(f"e{i}", i)))
    broken = True
    attempts: list[int] = []
    pending_at_commit: list[int] = []

    def patch(plane: ControlPlane) -> None:
        insert = plane.storage.insert_events

        async def flaky(events: Sequence[StoredEvent], bucket_seconds: int) -> IngestResult:
            attempts.append(len(events))
            if broken:
                raise StorageError("database is locked")
            result = await insert(events, bucket_seconds)
            pending_at_commit.append(await pending(r, stream))  # committed, not yet acked
            return result

        plane.storage.insert_events = flaky  # type: ignore[method-assign]

    with capture_logs() as logs:
        plane, [source] = await start(section(redis_url, stream, batch_size=2), patch=patch)

        async def retried() -> bool:
            return len(attempts) >= 4

        await eventually(retried)
        # Nothing stored, nothing acknowledged, and only one batch read ahead of storage.
        assert await stored(plane) == {}
        assert await pending(r, stream) == 2
        assert await lag(r, stream) == 3
        assert source.stats.entries == 0
        assert set(attempts) == {2}  # the same batch, retried

        broken = False

        async def recovered() -> bool:
            return source.stats.entries == 5 and await pending(r, stream) == 0

        await eventually(recovered)
    assert sorted(await stored(plane)) == [f"e{i}" for i in range(5)]
    assert pending_at_commit[0] == 2  # acknowledged only after the commit returned
    failures = [e for e in logs if e["event"] == "ingest.redis.store_failed"]
    assert failures and failures[0]["log_level"] == "error"
    assert "database is locked" in failures[0]["error"]


async def test_a_store_that_keeps_failing_is_reported_until_a_batch_is_committed(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    """A storage failure is not the entries' fault: the batch is retried, nothing is
    dead-lettered, and /readyz and controlplane_ingest_source_up say the source is failing
    (while Redis itself answers) until storage commits again."""
    await r.xadd(stream, entry(ev("e1")))
    broken = True

    def patch(plane: ControlPlane) -> None:
        insert = plane.storage.insert_events

        async def flaky(events: Sequence[StoredEvent], bucket_seconds: int) -> IngestResult:
            if broken:
                raise StorageError("database is locked")
            return await insert(events, bucket_seconds)

        plane.storage.insert_events = flaky  # type: ignore[method-assign]

    plane, [source] = await start(section(redis_url, stream), patch=patch)
    label = f"redis_streams:{stream}"

    async def retried() -> bool:
        return source.stats.retries >= 3

    await eventually(retried)
    report = source.failing()
    assert report is not None and report.startswith("failing since ")
    assert "cannot store events: StorageError: database is locked" in report
    ready = msgspec.to_builtins(await readiness(plane, State()))
    assert ready["checks"]["ingest"] == {label: report}
    [up] = [m for m in await scrape(plane, watching_since=None) if m.name.endswith("source_up")]
    assert [(s.labels, s.value) for s in up.samples] == [({"source": label}, 0)]
    assert source.failing() == report  # still failing since the first attempt
    assert source.stats.dead_lettered == 0 and await pending(r, stream) == 1

    broken = False

    async def recovered() -> bool:
        return source.stats.entries == 1

    await eventually(recovered)
    assert source.failing() is None
    ready = msgspec.to_builtins(await readiness(plane, State()))
    assert ready["checks"]["ingest"] == {label: "ok"}
    assert await stored(plane) == {"e1": MICROS_PER_TICK}
    assert await r.xlen(f"{stream}:dead") == 0


# dead consumers -------------------------------------------------------------------------


async def test_a_dead_consumers_entries_are_claimed_once_idle_long_enough(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [await r.xadd(stream, entry(ev(f"e{i}", i))) for i in range(4)]
    read = await r.xreadgroup(GROUP, "dead", {stream: ">"}, count=10)  # then it crashes
    assert len(read[0][1]) == 4
    # Two of them have been idle for ten minutes, two were read just now.
    await r.xclaim(stream, GROUP, "dead", 0, ids[:2], idle=600_000)

    settings = {"claim_idle_seconds": 60, "claim_interval_seconds": 0.05}
    plane, [source] = await start(section(redis_url, stream, consumer="alive", **settings))

    async def claimed_old() -> bool:
        return len(await stored(plane)) == 2

    await eventually(claimed_old)
    await asyncio.sleep(0.3)  # several more claim rounds
    assert sorted(await stored(plane)) == ["e0", "e1"]
    still_dead = await r.xpending_range(stream, GROUP, "-", "+", 10, consumername="dead")
    assert [p["message_id"] for p in still_dead] == ids[2:]  # not idle long enough: left alone
    assert source.stats.claimed == 2

    await r.xclaim(stream, GROUP, "dead", 0, ids[2:], idle=600_000)  # now they are

    async def claimed_all() -> bool:
        return len(await stored(plane)) == 4 and await pending(r, stream) == 0

    await eventually(claimed_all)
    assert source.stats.claimed == 4
    assert (source.stats.accepted, source.stats.duplicates) == (4, 0)


async def test_a_restarted_consumer_first_stores_its_own_pending_entries(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for i in range(3):
        await r.xadd(stream, entry(ev(f"e{i}", i)))
    await r.xreadgroup(GROUP, "fixed", {stream: ">"}, count=10)  # read, then crashed
    assert await lag(r, stream) == 0  # nothing left for a `>` read: only its own PEL has them

    plane, [source] = await start(section(redis_url, stream, consumer="fixed"))

    async def done() -> bool:
        return len(await stored(plane)) == 3 and await pending(r, stream) == 0

    await eventually(done)
    assert source.stats.claimed == 0  # not taken over: re-read by the same consumer


# invalid input: dead-letter stream --------------------------------------------------------


async def test_invalid_entries_go_to_the_dead_letter_stream_and_the_rest_is_stored(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    no_subject = {k: v for k, v in ev("b").items() if k != "subject"}
    bad_time = {**ev("d"), "ts": None, "time": "yesterday"}
    payloads: list[dict[str, bytes]] = [
        entry(ev("a")),
        entry(no_subject),
        {"event": b"{not json"},
        {"other": b"1"},
        entry([ev("c"), bad_time]),
        entry(ev("e")),
    ]
    ids = [await r.xadd(stream, p) for p in payloads]

    with capture_logs() as logs:
        plane, [source] = await start(section(redis_url, stream))

        async def done() -> bool:
            return source.stats.entries + source.stats.dead_lettered == 6

        await eventually(done)
    # The valid entries of the same read are stored; the array entry is dead-lettered whole.
    assert sorted(await stored(plane)) == ["a", "e"]
    assert await pending(r, stream) == 0
    assert source.stats.dead_lettered == 4

    dead = await r.xrange(f"{stream}:dead")
    assert sorted(d[1][b"id"] for d in dead) == ids[1:5]
    by_id = {d[1][b"id"]: d[1] for d in dead}
    assert by_id[ids[1]][b"error"] == b"subject: required"
    assert by_id[ids[1]][b"event"] == payloads[1]["event"]  # the original payload, as sent
    assert json.loads(by_id[ids[1]][b"errors"]) == [
        {"field": "subject", "message": "required", "index": None}
    ]
    assert by_id[ids[2]][b"error"].startswith(b"event: malformed JSON")
    assert by_id[ids[2]][b"event"] == b"{not json"
    assert by_id[ids[3]][b"error"] == b"event: missing field `event` (the event as JSON)"
    assert json.loads(by_id[ids[3]][b"fields"]) == {"other": "1"}
    assert by_id[ids[4]][b"error"] == (
        b"[1].time: not an RFC 3339 timestamp (like 2026-01-01T10:00:00Z): 'yesterday'"
    )
    assert all(
        d[b"stream"] == stream.encode() and d[b"group"] == GROUP.encode() for d in by_id.values()
    )
    logged = [e for e in logs if e["event"] == "ingest.redis.dead_lettered"]
    assert sorted(e["id"] for e in logged) == [i.decode() for i in ids[1:5]]


async def test_an_entry_the_store_refuses_for_its_values_is_dead_lettered_not_retried(
    start: Start, r: Any, redis_url: str, stream: str
) -> None:
    """A poison entry between good ones, in one read: `big2` takes org big's bucket past the
    bound together with `big1`, so storage refuses it (InvalidInput naming no index). It is
    dead-lettered once, never retried as if storage had failed, and everything around it,
    before and after, is stored."""
    mb = 600_000_000_000 // 20 * 1024  # 6e11 units each: 1.2e12 together, past 1e12
    big = [tick(f"big{i}", "big", T0 + i, mb=mb) for i in (1, 2)]
    payloads = [entry(e) for e in (ev("a"), ev("b"), big[0], ev("c"), big[1], ev("d"), ev("e"))]
    ids = [await r.xadd(stream, p) for p in payloads]
    with capture_logs() as logs:
        plane, [source] = await start(section(redis_url, stream))

        async def done() -> bool:
            return source.stats.entries + source.stats.dead_lettered == 7

        await eventually(done)
    assert await stored(plane) == {
        **{i: MICROS_PER_TICK for i in "abcde"},
        "big": 600_000_000_000 * 1_000_000,  # big1 alone
    }
    assert (source.stats.entries, source.stats.dead_lettered) == (6, 1)
    assert source.stats.retries == 0  # refused input is not a storage failure: no retry
    assert not [e for e in logs if e["event"] == "ingest.redis.store_failed"]
    assert source.failing() is None
    ready = msgspec.to_builtins(await readiness(plane, State()))
    assert ready["checks"]["ingest"] == {f"redis_streams:{stream}": "ok"}
    assert await pending(r, stream) == 0
    text = (await exposition(plane, watching_since=None)).decode()
    label = f'source="redis_streams:{stream}"'
    assert f"controlplane_ingest_dead_lettered_total{{{label}}} 1.0" in text

    ((_, dead),) = await r.xrange(f"{stream}:dead")
    assert dead[b"id"] == ids[4] and dead[b"event"] == payloads[4]["event"]
    assert b"'big2'" in dead[b"error"] and b"org 'big'" in dead[b"error"]
    [logged] = [e for e in logs if e["event"] == "ingest.redis.dead_lettered"]
    assert logged["id"] == ids[4].decode() and logged["log_level"] == "warning"
    assert "'big2'" in logged["error"]

    # Consumption goes on: a later entry is stored.
    await r.xadd(stream, entry(ev("f")))

    async def later() -> bool:
        return "f" in await stored(plane)

    await eventually(later)
    assert source.stats.dead_lettered == 1


async def test_an_entry_too_large_for_one_batch_is_dead_lettered_alone(
    make_config: Callable[..., Config], start: Start, r: Any, redis_url: str, stream: str
) -> None:
    big = [ev(f"big{i}") for i in range(60)]  # server.max_batch_events is 50 here
    await r.xadd(stream, entry(ev("a")))
    await r.xadd(stream, entry(big))
    await r.xadd(stream, entry(ev("b")))
    config = make_config(server={"max_batch_events": 50}, ingest=[section(redis_url, stream)])
    async with ControlPlane(config) as plane:
        [source] = await plane.start_ingest()
        assert isinstance(source, RedisStreamsIngest)

        async def done() -> bool:
            return source.stats.entries + source.stats.dead_lettered == 3

        await eventually(done)
        assert sorted(await stored(plane)) == ["a", "b"]
        [(_, dead)] = await r.xrange(f"{stream}:dead")
        assert dead[b"error"] == b"batch has 60 events; at most 50 are accepted at once"


# config, secrets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ingest", "message"),
    [
        ({"backend": "redis_streams"}, "ingest: expected a list of tables ([[ingest]])"),
        ([{"backend": "redis_streams", "url": "redis://x"}], "ingest[0].stream: required"),
        ([{"url": "redis://x", "stream": "s"}], "ingest[0].backend: required"),
        ([{"backend": "kafka"}], "ingest[0].backend: expected one of ['redis_streams'"),
        (
            [{"backend": "redis_streams", "url": "redis://x", "stream": "s", "strem": "t"}],
            "ingest[0].strem: unknown setting",
        ),
        (
            [
                {"backend": "redis_streams", "url": "redis://x", "stream": "s"},
                {"backend": "redis_streams", "url": "redis://x", "stream": "s", "batch_size": 0},
            ],
            "ingest[1].batch_size: Expected `int` >= 1",
        ),
        (
            [{"backend": "redis_streams", "url": "redis://x", "stream": 5}],
            "ingest[0].stream: Expected `str`, got `int`",
        ),
        (
            [{"backend": "redis_streams", "url": "r", "stream": "s", "dead_letter_stream": "s"}],
            "ingest[0]: dead_letter_stream must differ from stream",
        ),
    ],
)
def test_bad_ingest_config_names_the_setting(tmp_path: Path, ingest: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.parse(raw_config(tmp_path / "cp.db", ingest=ingest))
    assert message in str(err.value)


def test_ingest_config_defaults() -> None:
    raw = {"ingest": [{"backend": "redis_streams", "url": {"env": "REDIS_URL"}, "stream": "u"}]}
    [config] = config_mod.parse(raw).ingest
    assert isinstance(config, RedisStreamsIngestConfig)
    assert config.dead_letter == "u:dead"
    assert (config.group, config.source, config.start_id) == ("controlplane", "redis_streams", "0")


async def test_the_url_password_never_appears_in_logs(r: Any, redis_url: str, stream: str) -> None:
    password = "hunter2-redis-password"
    user = f"ingest-{uuid.uuid4().hex[:6]}"
    await r.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys="*", commands=["+@all"]
    )
    calls: list[int] = []

    async def sink(items: Sequence[Any], default_source: str) -> IngestResult:
        calls.append(len(items))
        return IngestResult(accepted=len(items), duplicates=0)

    await r.xadd(stream, entry(tick("e1", "acme", T0)))
    wrong = redis_url.replace("redis://", f"redis://{user}:{password}-wrong@")
    right = redis_url.replace("redis://", f"redis://{user}:{password}@")
    with capture_logs() as logs:
        for url in (wrong, right):
            config = RedisStreamsIngestConfig(url=url, stream=stream, retry_base_seconds=0.01)
            assert password not in repr(config)
            source = RedisStreamsIngest(config)
            await source.start(sink)

            async def refused_or_read(url: str = url, source: RedisStreamsIngest = source) -> bool:
                if url == right:
                    return calls == [1]  # the right password reads the entry
                return source.stats.retries >= 2  # refused, and retried

            await eventually(refused_or_read)
            await source.close()
            if url == wrong:
                assert calls == []  # refused: nothing read
    refused = [e for e in logs if e["event"] == "ingest.redis.unavailable"]
    assert refused and refused[0]["error"].startswith("AuthenticationError")
    assert password not in repr(logs)
    assert {e["redis"] for e in logs if "redis" in e} == {redis_url}


async def test_a_source_that_cannot_reach_redis_reports_it_and_recovers(
    start: Start, redis_url: str, stream: str, r: Any
) -> None:
    import redis.asyncio as aioredis

    plane, [source] = await start(section(redis_url, stream, retry_base_seconds=0.01))
    await r.xadd(stream, entry(tick("e1", "acme", T0)))
    await eventually(lambda: _usage(plane, 1))
    assert source.failing() is None
    client = source._client
    source._client = aioredis.Redis.from_url(  # the server goes away: connections refused
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2
    )

    async def reported() -> bool:
        return source.failing() is not None

    await eventually(reported)
    assert source.failing().startswith("failing since ")  # type: ignore[union-attr]
    ready = msgspec.to_builtins(await readiness(plane, State()))
    [up] = [m for m in await scrape(plane, watching_since=None) if m.name.endswith("source_up")]
    # HTTP ingest still works: the replica stays ready and says what cannot consume
    assert ready["status"] == "ready"
    assert ready["checks"]["ingest"][f"redis_streams:{stream}"].startswith("failing since ")
    assert [(s.labels, s.value) for s in up.samples] == [({"source": f"redis_streams:{stream}"}, 0)]

    await source._client.aclose()
    source._client = client  # back: the next step succeeds and the report clears
    await r.xadd(stream, entry(tick("e2", "acme", T0 + 20)))
    await eventually(lambda: _usage(plane, 2))
    assert source.failing() is None


async def _usage(plane: ControlPlane, events: int) -> bool:
    rows = await plane.storage.usage("acme", None, None, None)
    return sum(u.value_micros for u in rows) == events * 20_000_000


# serve ------------------------------------------------------------------------------------


def _write_config(tmp_path: Path, redis_url: str, stream: str) -> Path:
    path = tmp_path / "cp.toml"
    path.write_text(
        f"""
[storage]
backend = "sqlite"
path = "{tmp_path / "serve.db"}"

[[auth.tokens]]
name = "t"
sha256 = "{token_hash(TOKEN)}"
scopes = ["read"]

[logging]
level = "warning"

[[meters]]
name = "gbs"
event_type = "tick"
value = "data.mb * data.s / 1024"

[[ingest]]
backend = "redis_streams"
url = "{redis_url}"
stream = "{stream}"
consumer = "serve-test"
block_ms = 100
"""
    )
    return path


async def test_serve_starts_the_configured_consumer_and_closes_it_on_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, r: Any, redis_url: str, stream: str
) -> None:
    import uvicorn

    from controlplane.cli import main

    served: list[bool] = []

    async def serving(server: Any, sockets: Any = None) -> None:
        """Stands in for uvicorn's loop: asks the app while `serve` has everything started."""
        async with AsyncTestClient(app=server.config.app) as client:

            async def stored() -> bool:
                answer = await client.get(
                    "/v1/usage",
                    params={"org": "acme", "meter": "gbs", "from": T0, "to": T0 + HOUR},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                return answer.status_code == 200 and answer.json()["rows"] == [
                    {"org_id": "acme", "meter": "gbs", "bucket_start": T0, "value": "20"}
                ]

            await eventually(stored)
        served.append(True)

    monkeypatch.setattr(uvicorn.Server, "serve", serving)
    monkeypatch.setattr("controlplane.logs.configure", lambda config: None)
    path = _write_config(tmp_path, redis_url, stream)
    await r.xadd(stream, entry(tick("e1", "acme", T0)))

    # A one-shot command does not consume the stream.
    assert await asyncio.to_thread(main, ["rollup", "--config", str(path)]) == 0
    assert await r.exists(stream) == 1 and await r.xinfo_groups(stream) == []

    serve = ["serve", "--config", str(path), "--no-scheduler"]
    assert await asyncio.to_thread(main, serve) == 0
    assert served == [True]
    (group,) = await r.xinfo_groups(stream)
    assert group["name"] == GROUP.encode() and group["entries-read"] == 1
    # After shutdown: everything acknowledged, and the consumer (with nothing pending) is gone.
    assert await pending(r, stream) == 0
    assert await r.xinfo_consumers(stream, GROUP) == []


def test_serve_names_the_ingest_entry_whose_url_cannot_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.cli import main

    monkeypatch.setattr("controlplane.logs.configure", lambda config: None)
    secret = "RedX9pw"
    path = _write_config(tmp_path, f"redis://carol:{secret}/abc@127.0.0.1:1/0", "s")
    assert main(["serve", "--config", str(path), "--no-scheduler"]) == 2
    err = capsys.readouterr().err
    assert "error: ingest[0].url: " in err and "percent-encode" in err
    assert secret not in err and "Traceback" not in err


async def test_an_app_without_ingest_does_not_consume(
    make_config: Callable[..., Config], r: Any, redis_url: str, stream: str
) -> None:
    await r.xadd(stream, entry(ev("e1")))
    plane = ControlPlane(make_config(ingest=[section(redis_url, stream)]))
    async with AsyncTestClient(app=create_app(plane.config, cp=plane)) as client:
        assert (await client.get("/healthz")).status_code == 200
        await asyncio.sleep(0.2)
        assert await stored(plane) == {}
    assert await r.xinfo_groups(stream) == []
