"""Every benchmark runs, at a tiny size, to its verified ratio line.

The figures are not checked here (speed is for `bench/` and docs/benchmarks.md, never a timed
assertion); what is checked is that each benchmark still builds its workload against the
current schema, verifies the product's rows, and ends with its `RATIO` line. Two of them had
stopped running after the ledger and the events gained columns, unnoticed until measured.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

SMALL = {
    "ingest": ["--events", "3000", "--batch", "500", "--clients", "2", "--orgs", "50"],
    "rollup": ["--events", "20000", "--orgs", "100", "--buckets", "4"],
    "parity": ["--orgs", "200", "--buckets", "4", "--requests", "5", "--warmup", "1"],
    "send": ["--orgs", "5", "--buckets", "2", "--rounds", "1", "--no-httpx"],
    "gauge": ["--series", "200", "--orgs", "20", "--buckets", "4"],
    "reconcile": ["--customers", "50", "--hours", "4", "--paced", "0"],
    "memory": ["--events", "4000", "--clients", "2"],
}


def run(module: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("RATIO "), output[-3000:]
    assert "VERIFY FAILED" not in output and "WRONG" not in output, output[-3000:]
    return done.stdout


@pytest.mark.parametrize("module", sorted(SMALL))
def test_each_benchmark_runs_to_its_ratio(module: str) -> None:
    run(module, *SMALL[module])


def test_ingest_on_postgresql_runs_to_its_ratio(postgres_dsn: str) -> None:
    run("ingest", "--storage", "postgres", "--dsn", postgres_dsn, *SMALL["ingest"])


def test_redis_ingest_runs_to_its_ratio(redis_url: str) -> None:
    run("redis_ingest", "--events", "3000", "--orgs", "50", "--redis-url", redis_url)
