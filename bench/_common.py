"""What both benchmarks share: the synthetic workload, the raw SQLite baseline, reporting.

The workload is deterministic: event ``i`` of ``n`` belongs to org ``i % orgs`` and to hour
``i * buckets // n``, so events arrive in time order (as live traffic does) and every
(org, hour) pair is covered once ``n >= orgs * buckets``. Its meter value is computed here
independently of the product (integer half-even rounding), and both benchmarks check the
product's stored rows against these.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "migrations" / "sqlite"

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a bucket boundary
BUCKET_SECONDS = 3600
SOURCE = "bench"
EVENT_TYPE = "usage_tick"
METER = "memory_gb_seconds"
METER_CONFIG = {  # the one meter every benchmark uses, as config.example.toml declares it
    "name": METER,
    "event_type": EVENT_TYPE,
    "value": "data.memory_mb * data.interval_s / 1024",
    "where": "data.memory_mb > 0",
    "unit": "GB-second",
}
METER_TOML = f"""
[[meters]]
name = "{METER}"
event_type = "{EVENT_TYPE}"
value = "data.memory_mb * data.interval_s / 1024"
where = "data.memory_mb > 0"
unit = "GB-second"
"""

_encode = msgspec.json.Encoder().encode

EventRow = tuple[int, str, str, str, str, int, str, int]
ValueRow = tuple[int, str, str, int, int]
DirtyRow = tuple[str, int]


# workload ---------------------------------------------------------------------------------


class Workload(msgspec.Struct, frozen=True):
    events: int
    orgs: int
    buckets: int

    def org(self, i: int) -> str:
        return f"org-{i % self.orgs:05d}"

    def bucket(self, i: int) -> int:
        return T0 + (i * self.buckets // self.events) * BUCKET_SECONDS

    def event(self, i: int) -> dict[str, Any]:
        """Event `i` as a client sends it."""
        return {
            "id": f"evt-{i:09d}",
            "type": EVENT_TYPE,
            "subject": self.org(i),
            "source": SOURCE,
            "ts": self.bucket(i) * 1000 + (i % 3600) * 1000 + i % 1000,
            "data": {"memory_mb": 100 + (i * 7) % 3997, "interval_s": 1 + i % 60},
        }


def micros_of(data: dict[str, int]) -> int:
    """`data.memory_mb * data.interval_s / 1024` in micro-units, rounded half-even."""
    q, r = divmod(data["memory_mb"] * data["interval_s"] * 1_000_000, 1024)
    if 2 * r > 1024 or (2 * r == 1024 and q % 2):
        q += 1
    return q


def rows_for(
    events: Sequence[dict[str, Any]], first_pk: int, received_at: int
) -> tuple[list[EventRow], list[ValueRow], list[DirtyRow]]:
    """The rows the product writes for one batch: usage_events, meter_values, dirty marks."""
    event_rows: list[EventRow] = []
    value_rows: list[ValueRow] = []
    dirty: set[DirtyRow] = set()
    pk = first_pk
    for e in events:
        bucket = e["ts"] // 1000 - (e["ts"] // 1000) % BUCKET_SECONDS
        event_rows.append(
            (
                pk,
                e["source"],
                e["id"],
                e["type"],
                e["subject"],
                e["ts"],
                _encode(e["data"]).decode(),
                received_at,
            )
        )
        value_rows.append((pk, METER, e["subject"], bucket, micros_of(e["data"])))
        dirty.add((e["subject"], bucket))
        pk += 1
    return event_rows, value_rows, sorted(dirty)


def batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


# raw SQLite -------------------------------------------------------------------------------


def connect(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """A connection with the storage plugin's PRAGMAs (WAL, synchronous FULL, foreign keys)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def apply_migrations(conn: sqlite3.Connection) -> list[str]:
    """Every migrations/sqlite/*.sql file in order, as plain scripts."""
    applied = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        conn.executescript(path.read_text())
        applied.append(path.name)
    return applied


def digest(conn: sqlite3.Connection) -> dict[str, Any]:
    """What ingest stored, independent of primary keys and commit order: counts and hashes."""
    out: dict[str, Any] = {}
    for table in ("usage_events", "meter_values", "dirty_buckets"):
        out[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    out["sum_micros"] = conn.execute(
        "SELECT coalesce(sum(micros), 0) FROM meter_values"
    ).fetchone()[0]
    h = hashlib.sha256()
    for row in conn.execute(
        "SELECT e.source, e.event_id, e.type, e.org_id, e.time_ms, e.data,"
        " v.meter, v.org_id, v.bucket_start, v.micros"
        " FROM usage_events e JOIN meter_values v ON v.event_pk = e.id"
        " ORDER BY e.source, e.event_id, v.meter"
    ):
        h.update(repr(row).encode())
    for row in conn.execute("SELECT org_id, bucket_start FROM dirty_buckets ORDER BY 1, 2"):
        h.update(repr(row).encode())
    out["sha256"] = h.hexdigest()[:16]
    return out


# reporting --------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    )


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def ratio_line(label: str, ratio: float, target: float) -> str:
    verdict = "met" if ratio >= target else "MISSED"
    return f"RATIO {label} = {ratio:.2f} (target >= {target:.2f}: {verdict})"


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop a `controlplane serve` started by a benchmark: SIGINT, then kill after 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
