"""Resident memory of `controlplane serve` under ingest: 600,000 events from 4 and from 64
concurrent clients, the server's RSS read from /proc while they post.

    python -m bench.memory [--events 600000] [--batch 1000] [--clients 4,64]

For each client count: a fresh SQLite file and `controlplane serve --no-scheduler` in a
subprocess (as `bench.ingest` starts it); its resident set size (``VmRSS``) is sampled every
100 ms from the first request to the last response. Prints, per run, the RSS when ready, the
peak, and the RSS at each quarter of the events sent (flat: the last quarter grows by less
than 10 % of the peak). The target is a peak of at most 150 MB; the last line is the ratio
150 MB / the highest peak (>= 1.00: met).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench._common import Workload, machine, ratio_line, stop_server
from bench.ingest import _config, _free_port, _post_all, _wait_ready, prepare

TARGET_MB = 150.0


def rss_mb(pid: int) -> float | None:
    """The resident set size of `pid` in MB (Linux), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Samples a process's RSS every `interval` seconds, with how many events were sent."""

    def __init__(self, pid: int, sent: list[int], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.sent, self.interval = pid, sent, interval
        self.samples: list[tuple[int, float]] = []  # (events sent, MB)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            mb = rss_mb(self.pid)
            if mb is not None:
                self.samples.append((self.sent[0], mb))
            time.sleep(self.interval)


def one_run(work: Path, bodies: list[bytes], sizes: list[int], clients: int) -> dict[str, float]:
    port, token = _free_port(), secrets.token_urlsafe(16)
    config = work / f"memory-{clients}.toml"
    config.write_text(_config(work / f"memory-{clients}.db", port, token))
    log = (work / f"server-{clients}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane", "serve", "--config", str(config), "--no-scheduler"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}", work / f"server-{clients}.log")
        ready = rss_mb(proc.pid) or 0.0
        sent = [0]
        sampler = Sampler(proc.pid, sent)
        counted = [0]

        def count(n: int) -> None:
            counted[0] += n
            sent[0] = counted[0]

        sampler.start()
        started = time.perf_counter()
        accepted, _, _ = asyncio.run(
            _post_all(f"http://127.0.0.1:{port}", token, bodies, sizes, clients, on_done=count)
        )
        seconds = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
    finally:
        stop_server(proc)
        log.close()
    total = sum(sizes)
    if accepted != total:
        raise RuntimeError(f"{clients} clients: {accepted} of {total} events accepted")
    samples = sampler.samples or [(0, ready)]
    peak = max(mb for _, mb in samples)
    quarters = []
    for q in (1, 2, 3, 4):
        upto = [mb for n, mb in samples if n <= total * q / 4]
        quarters.append(max(upto) if upto else ready)
    return {
        "ready": ready,
        "peak": peak,
        "q1": quarters[0],
        "q2": quarters[1],
        "q3": quarters[2],
        "q4": quarters[3],
        "seconds": seconds,
        "events_per_s": total / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--batch", type=int, default=1000, help="events per request")
    parser.add_argument("--clients", default="4,64", help="client counts, comma-separated")
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--buckets", type=int, default=24)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    print(
        f"memory benchmark (sqlite, synchronous=full; the server in its own process) on {machine()}"
    )
    print(f"  load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    wl = Workload(args.events, args.orgs, args.buckets)
    _, bodies, sizes = prepare(wl, argparse.Namespace(batch=args.batch, clients=counts[0]))
    work = Path(tempfile.mkdtemp(prefix="cp-bench-memory-"))
    peaks = []
    try:
        for clients in counts:
            r = one_run(work, bodies, sizes, clients)
            peaks.append(r["peak"])
            flat = r["q4"] - r["q3"] < 0.1 * r["peak"]
            print(
                f"  {clients:>3} clients: ready {r['ready']:.0f} MB, peak {r['peak']:.0f} MB; by "
                f"quarter {r['q1']:.0f} / {r['q2']:.0f} / {r['q3']:.0f} / {r['q4']:.0f} MB "
                f"({'flat' if flat else 'GROWING'}); {r['events_per_s']:,.0f} events/s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(ratio_line(f"{TARGET_MB:.0f} MB / peak RSS", TARGET_MB / max(peaks), 1.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
