"""Redis Streams ingest: a consumer group reads usage events from a stream into the pipeline.

    [[ingest]]
    backend = "redis_streams"
    url = { env = "REDIS_URL" }       # redis://[user:password@]host:6379/0, rediss://, unix://
    stream = "usage"
    group = "controlplane"

**Entry format.** Each stream entry carries its usage event as JSON in the field ``event``: one
canonical event object (see :mod:`controlplane.events`), or a JSON array of them. Other fields
are ignored. ``XADD usage * event '{"id": "e1", "type": "usage_tick", "subject": "acme", ...}'``

**Delivery.** Entries are read with ``XREADGROUP`` (at most `batch_size` at a time), handed to
the pipeline as one batch, and acknowledged (``XACK``) only after that batch was committed.
Delivery is at least once; the pipeline's dedupe on ``(source, id)`` makes it exactly once.

What happens to a batch depends on how the sink fails:

=========================================  ===============================================
the sink                                   the consumer
=========================================  ===============================================
returns (the batch is committed)           acknowledges the batch's entries
raises ``InvalidInput`` naming events      dead-letters the entries holding them, stores
                                           the others
raises ``InvalidInput`` about the batch    halves the batch until the entry at fault is
as a whole (too many events; storage       alone, and dead-letters it: every other entry
refusing a value: a bucket past its bound) is stored
raises anything else (``StorageError``)    retries the same batch with capped exponential
                                           backoff, acknowledges nothing, and reports it in
                                           :meth:`~RedisStreamsIngest.failing` until a
                                           store call answers
=========================================  ===============================================

``InvalidInput`` is permanent: the same entry would be refused again, so retrying it would
only stop the stream behind it. Any other failure may pass, and retrying loses nothing. The
consumer never reads ahead of what storage has committed by more than one batch, so a slow or
failing store holds the backlog in Redis.

**Bad entries** (an event that fails validation or that storage refuses for its values, a
missing ``event`` field, JSON that does not parse) are moved whole to the dead-letter stream
(default ``<stream>:dead``) with the error, acknowledged, logged (``ingest.redis.dead_lettered``)
and counted (``stats.dead_lettered``); the other entries of the same read are stored. An entry
is the unit: an array entry with one bad event is dead-lettered with all of its events.

**Dead consumers.** Entries a consumer read but never acknowledged (it crashed) are taken over
with ``XAUTOCLAIM`` by any consumer of the group once idle for `claim_idle_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import msgspec
import structlog

from controlplane.errors import ConfigError, InvalidInput, Problem
from controlplane.events import decode_body
from controlplane.interfaces import EventSink, IngestResult, IngestSource, PluginConfig
from controlplane.registry import PluginSpec, require
from controlplane.secrets import Secret, check_url, reveal

log = structlog.get_logger("ingest.redis")

Name = Annotated[str, msgspec.Meta(min_length=1)]
Positive = Annotated[float, msgspec.Meta(gt=0)]

EVENT_FIELD = b"event"
_encode = msgspec.json.Encoder().encode


class RedisStreamsIngestConfig(PluginConfig, tag="redis_streams", tag_field="backend", frozen=True):
    """One ``[[ingest]]`` table with ``backend = "redis_streams"``."""

    url: Secret  # redis://[user:password@]host:port/db; a secret: may hold the password
    stream: Name
    group: Name = "controlplane"
    consumer: Name | None = None  # None: "<hostname>-<pid>", unique per process
    source: Name = "redis_streams"  # the `source` of events that name none
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 1000  # entries per read (and per commit)
    block_ms: Annotated[int, msgspec.Meta(ge=1)] = 1000  # longest wait of one read
    claim_idle_seconds: Positive = 60.0  # take over another consumer's entries idle this long
    claim_interval_seconds: Positive = 30.0  # how often to look for such entries
    dead_letter_stream: Name | None = None  # None: "<stream>:dead"
    start_id: Name = "0"  # where a newly created group starts: "0" everything, "$" new only
    retry_base_seconds: Positive = 0.5  # first backoff after a failure
    retry_cap_seconds: Positive = 30.0  # longest backoff
    timeout_seconds: Positive = 10.0  # connect timeout; a reply may take block_ms longer

    def __post_init__(self) -> None:
        if self.retry_cap_seconds < self.retry_base_seconds:
            raise ValueError("retry_cap_seconds must be >= retry_base_seconds")
        if self.dead_letter_stream == self.stream:
            raise ValueError("dead_letter_stream must differ from stream")

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    def __repr__(self) -> str:
        url = repr(self.url) if not isinstance(self.url, str) else repr(redact(self.url))
        return (
            f"RedisStreamsIngestConfig(url={url}, stream={self.stream!r}, group={self.group!r},"
            f" consumer={self.consumer!r})"
        )


def redact(url: str) -> str:
    """The URL without credentials or query (which may hold a password), for logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "<invalid redis url>"
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def _passwords(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += parse_qs(parts.query).get("password", [])
    return [p for p in found if p]


@dataclass
class Stats:
    """What the consumer has done since it started (for tests, benchmarks and logs)."""

    entries: int = 0  # acknowledged after their events were committed
    accepted: int = 0  # events stored
    duplicates: int = 0  # events already stored
    dead_lettered: int = 0  # entries moved to the dead-letter stream
    claimed: int = 0  # entries taken over from idle consumers
    retries: int = 0  # failed attempts to store a batch (or to reach Redis)


@dataclass
class _Entry:
    id: bytes
    fields: dict[bytes, bytes]
    events: list[Any] = field(default_factory=list)
    array: bool = False  # the `event` field held a JSON array
    problem: str | None = None  # why it cannot be read at all


class _Stopped(Exception):
    """The source is closing: leave what is not committed pending."""


def _where(problem: Problem) -> str:
    where = (f"[{problem.index}]" if problem.index is not None else "") + (
        f".{problem.field}" if problem.index is not None and problem.field else problem.field
    )
    return f"{where}: {problem.message}" if where else problem.message


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _parse(raw_id: bytes, fields: dict[bytes, bytes] | None) -> _Entry:
    entry = _Entry(id=raw_id, fields=dict(fields or {}))
    payload = entry.fields.get(EVENT_FIELD)
    if payload is None:
        entry.problem = (
            "entry was deleted from the stream before it was stored"
            if not entry.fields
            else "missing field `event` (the event as JSON)"
        )
        return entry
    entry.array = payload.lstrip()[:1] == b"["
    try:
        entry.events = decode_body(payload, "application/json")
    except InvalidInput as exc:
        entry.problem = exc.message
    return entry


def _entries_of(response: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The (id, fields) pairs of an XREADGROUP reply, in either of redis-py's shapes."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else (r[1] for r in response)
    out: list[tuple[bytes, dict[bytes, bytes] | None]] = []
    for entries in streams:
        if entries and isinstance(entries[0], list):  # RESP3: {stream: [entries]}
            entries = entries[0]
        out.extend((e[0], e[1]) for e in entries or () if e[0] is not None)
    return out


class RedisStreamsIngest(IngestSource):
    """A consumer of one stream in one consumer group; see the module docstring."""

    name: ClassVar[str] = "redis_streams"

    def __init__(self, config: RedisStreamsIngestConfig) -> None:
        self._redis = require("redis.asyncio", "redis_streams", "redis")
        self._exceptions = require("redis.exceptions", "redis_streams", "redis")
        self.config = config
        self.consumer = config.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stats = Stats()
        self._client: Any = None
        self._sink: EventSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._failing: tuple[int, str] | None = None  # (since, error) while steps fail
        self._blocking = False  # inside a blocking read: close() may interrupt it
        self._group_ready = False
        self._backlog = True  # read this consumer's own pending entries before new ones
        self._claim_cursor: bytes | str = "0-0"
        self._next_claim = 0.0
        self._secrets: list[str] = []
        self._log = log.bind(stream=config.stream, group=config.group, consumer=self.consumer)

    # lifecycle ----------------------------------------------------------------------------

    async def start(self, sink: EventSink) -> None:
        if self._task is not None:
            return
        url = reveal(self.config.url, "ingest.url")
        check_url(url, "ingest.url")
        try:
            self._client = self._redis.Redis.from_url(
                url,
                decode_responses=False,
                socket_connect_timeout=self.config.timeout_seconds,
                socket_timeout=self.config.timeout_seconds + self.config.block_ms / 1000,
            )
        except ValueError:  # its text may quote part of the password
            raise ConfigError(
                f"ingest.url: expected redis://, rediss:// or unix:// (got {redact(url)!r})"
            ) from None
        self._secrets = _passwords(url)
        self._sink = sink
        self._stopping.clear()
        self._log = self._log.bind(redis=redact(url))
        self._task = asyncio.create_task(self._run(), name=f"ingest.redis:{self.config.stream}")
        self._log.info("ingest.redis.started")

    @property
    def label(self) -> str:
        return f"redis_streams:{self.config.stream}"

    @property
    def dead_lettered(self) -> int:
        return self.stats.dead_lettered

    def failing(self) -> str | None:
        if self._failing is None:
            return None
        since, error = self._failing
        return f"failing since {since}: {error}"

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            if self._blocking:
                task.cancel()  # an interrupted read leaves its entries pending: nothing lost
            done, _ = await asyncio.wait({task}, timeout=self.config.block_ms / 1000 + 10)
            if not done:
                task.cancel()
                await asyncio.wait({task})
            crash = None if task.cancelled() else task.exception()
            if crash is not None:
                self._log.error("ingest.redis.crashed", error=self._safe(crash))
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await self._forget_consumer(client)
        except Exception as exc:
            self._log.warning("ingest.redis.close_failed", error=self._safe(exc))
        finally:
            await client.aclose()
        self._log.info("ingest.redis.stopped", **vars(self.stats))

    async def _forget_consumer(self, client: Any) -> None:
        """Remove this consumer from the group when it holds no pending entries, so
        short-lived consumer names do not pile up (one with pending entries is kept: deleting
        it would drop them from the group's pending list)."""
        if not self._group_ready:
            return
        mine = await client.xpending_range(
            self.config.stream, self.config.group, "-", "+", 1, consumername=self.consumer
        )
        if not mine:
            await client.xgroup_delconsumer(self.config.stream, self.config.group, self.consumer)

    # the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.config.retry_base_seconds
        while not self._stopping.is_set():
            try:
                await self._step()
                delay = self.config.retry_base_seconds
                self._failing = None
            except _Stopped:
                return
            except Exception as exc:
                self.stats.retries += 1
                since = self._failing[0] if self._failing else int(time.time())
                self._failing = (since, self._safe(exc))
                if "NOGROUP" in str(exc):
                    self._group_ready = False
                self._backlog = True  # entries read but not acknowledged are ours: reread
                self._log.warning("ingest.redis.unavailable", error=self._safe(exc), retry_in=delay)
                if await self._wait_stopping(delay):
                    return
                delay = min(delay * 2, self.config.retry_cap_seconds)

    async def _step(self) -> None:
        if not self._group_ready:
            await self._ensure_group()
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_claim:
            claimed = await self._claim(loop.time())
            if claimed:
                await self._process(claimed)
                return
        if self._backlog:
            entries = await self._read("0")
            if not entries:
                self._backlog = False
                return
        elif self._stopping.is_set():
            return
        else:
            entries = await self._read(">")
        if entries:
            await self._process(entries)

    async def _ensure_group(self) -> None:
        c = self.config
        try:
            await self._client.xgroup_create(c.stream, c.group, id=c.start_id, mkstream=True)
            self._log.info("ingest.redis.group_created", start_id=c.start_id)
        except self._exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(self, from_id: str) -> list[_Entry]:
        c = self.config
        blocking = from_id == ">"
        self._blocking = blocking
        try:
            response = await self._client.xreadgroup(
                c.group,
                self.consumer,
                {c.stream: from_id},
                count=c.batch_size,
                block=c.block_ms if blocking else None,
            )
        finally:
            self._blocking = False
        return [_parse(i, f) for i, f in _entries_of(response)]

    async def _claim(self, now: float) -> list[_Entry]:
        c = self.config
        reply = await self._client.xautoclaim(
            c.stream,
            c.group,
            self.consumer,
            min_idle_time=int(c.claim_idle_seconds * 1000),
            start_id=self._claim_cursor,
            count=c.batch_size,
        )
        cursor, raw = reply[0], reply[1]
        self._claim_cursor = cursor
        if _text(cursor) == "0-0":  # scanned the whole pending list: wait for the next round
            self._next_claim = now + c.claim_interval_seconds
        entries = [_parse(i, f) for i, f in raw or () if i is not None]
        if entries:
            self.stats.claimed += len(entries)
            self._log.info(
                "ingest.redis.claimed",
                entries=len(entries),
                first=_text(entries[0].id),
                idle_seconds=c.claim_idle_seconds,
            )
        return entries

    # one read: store, dead-letter, acknowledge ----------------------------------------------

    async def _process(self, entries: list[_Entry]) -> None:
        unreadable = [e for e in entries if e.problem is not None]
        if unreadable:
            await self._dead_letter(
                [(e, [Problem(field="event", message=e.problem or "")]) for e in unreadable]
            )
        await self._deliver([e for e in entries if e.problem is None])

    async def _deliver(self, entries: list[_Entry]) -> None:
        """Store the entries' events in one batch and acknowledge them; on invalid input,
        dead-letter exactly the entries at fault and store the rest."""
        while entries:
            items: list[Any] = []
            owners: list[tuple[int, int]] = []  # batch index -> (entry, index in the entry)
            for n, entry in enumerate(entries):
                for k, event in enumerate(entry.events):
                    items.append(event)
                    owners.append((n, k))
            if not items:  # only empty arrays: nothing to store
                await self._ack(entries, IngestResult(accepted=0, duplicates=0))
                return
            try:
                result = await self._store(items)
            except InvalidInput as exc:
                faults: dict[int, list[Problem]] = {}
                for p in exc.problems:
                    if p.index is not None and 0 <= p.index < len(owners):
                        n, k = owners[p.index]
                        index = k if entries[n].array else None
                        faults.setdefault(n, []).append(
                            Problem(field=p.field, message=p.message, index=index)
                        )
                if not faults:  # about the batch as a whole (e.g. too many events): halve it
                    if len(entries) == 1:
                        await self._dead_letter([(entries[0], exc.problems)])
                        return
                    half = len(entries) // 2
                    await self._deliver(entries[:half])
                    await self._deliver(entries[half:])
                    return
                await self._dead_letter([(entries[n], faults[n]) for n in sorted(faults)])
                entries = [e for n, e in enumerate(entries) if n not in faults]
                continue
            await self._ack(entries, result)
            return

    async def _store(self, items: Sequence[Any]) -> IngestResult:
        """Hand one batch to the sink, retrying with capped exponential backoff until it is
        committed. InvalidInput is the batch's fault and is raised; any other failure is
        storage's, and retrying is the only way forward that loses nothing. While it fails,
        :meth:`failing` says so (``/readyz``, ``controlplane_ingest_source_up``)."""
        assert self._sink is not None
        delay = self.config.retry_base_seconds
        attempt = 0
        while True:
            try:
                result = await self._sink(items, self.config.source)
            except InvalidInput:
                self._failing = None  # storage answered: the entries are at fault, not it
                raise
            except Exception as exc:
                attempt += 1
                self.stats.retries += 1
                error = self._safe(exc)
                since = self._failing[0] if self._failing else int(time.time())
                self._failing = (since, f"cannot store events: {error}")
                self._log.error(
                    "ingest.redis.store_failed",
                    events=len(items),
                    attempt=attempt,
                    retry_in=delay,
                    error=error,
                )
                if await self._wait_stopping(delay):
                    raise _Stopped from exc
                delay = min(delay * 2, self.config.retry_cap_seconds)
            else:
                self._failing = None
                return result

    async def _ack(self, entries: list[_Entry], result: IngestResult) -> None:
        await self._client.xack(self.config.stream, self.config.group, *(e.id for e in entries))
        self.stats.entries += len(entries)
        self.stats.accepted += result.accepted
        self.stats.duplicates += result.duplicates
        self._log.debug(
            "ingest.redis.committed",
            entries=len(entries),
            accepted=result.accepted,
            duplicates=result.duplicates,
        )

    async def _dead_letter(self, faulty: list[tuple[_Entry, Sequence[Problem]]]) -> None:
        """Copy each entry to the dead-letter stream with its errors and acknowledge it, in
        one MULTI/EXEC: an entry is either still pending or dead-lettered, never lost."""
        c = self.config
        async with self._client.pipeline(transaction=True) as pipe:
            for entry, problems in faulty:
                error = "; ".join(_where(p) for p in problems)
                record: dict[bytes, bytes | str] = {
                    b"error": error,
                    b"errors": _encode(problems),
                    b"stream": c.stream,
                    b"id": entry.id,
                    b"group": c.group,
                    b"consumer": self.consumer,
                }
                if EVENT_FIELD in entry.fields:
                    record[EVENT_FIELD] = entry.fields[EVENT_FIELD]
                else:
                    fields = {_text(k): _text(v) for k, v in entry.fields.items()}
                    record[b"fields"] = _encode(fields)
                pipe.xadd(c.dead_letter, record)
                self._log.warning(
                    "ingest.redis.dead_lettered",
                    id=_text(entry.id),
                    dead_letter_stream=c.dead_letter,
                    error=error,
                )
            pipe.xack(c.stream, c.group, *(entry.id for entry, _ in faulty))
            await pipe.execute()
        self.stats.dead_lettered += len(faulty)

    # helpers ------------------------------------------------------------------------------

    async def _wait_stopping(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when the source is closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def _safe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


spec = PluginSpec(
    kind="ingest", name="redis_streams", config=RedisStreamsIngestConfig, factory=RedisStreamsIngest
)
