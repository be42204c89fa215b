"""`controlplane ingest`: backfill events from an NDJSON or CSV file, with a progress line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from controlplane.cli.common import Subparsers, core, json_option, print_json
from controlplane.config import Config
from controlplane.errors import InvalidInput
from controlplane.events import DEFAULT_SOURCE


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = json_option(
        sub.add_parser(
            "ingest", parents=[common], help="backfill events from an NDJSON or CSV file"
        )
    )
    p.add_argument("file", help="the file to read (NDJSON: one event per line; CSV: a header)")
    p.add_argument("--format", choices=["ndjson", "csv"], help="default: from the file's extension")
    p.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"source for events that name none (default: {DEFAULT_SOURCE}, as over HTTP: "
        "events are deduplicated by (source, id), so a backfill of events that also came in "
        "live finds them duplicates; for events that came from an [[ingest]] stream, give "
        "that table's `source`)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help="events per transaction (default 1000): a batch with an invalid event stores none",
    )
    p.add_argument("--dry-run", action="store_true", help="validate and report; store nothing")
    p.set_defaults(func=ingest)


class Progress:
    """A one-line progress report on stderr, redrawn at most every 0.2 s."""

    def __init__(self, total_bytes: int) -> None:
        self.total = max(total_bytes, 1)
        self.started = time.monotonic()
        self.last = 0.0
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def update(self, done_bytes: int, events: int, final: bool = False) -> None:
        now = time.monotonic()
        if (not final and now - self.last < (0.2 if self.tty else 5.0)) or events == self.shown:
            return
        self.last, self.shown = now, events
        pct = min(100.0, 100.0 * done_bytes / self.total)
        rate = events / max(now - self.started, 1e-9)
        width = 30
        bar = "#" * int(width * pct / 100)
        line = f"[{bar:<{width}}] {pct:5.1f}%  {events} events  {rate:,.0f}/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


async def ingest(args: argparse.Namespace, config: Config) -> int:
    from controlplane.plugins.ingest.file import detect_format, read_lines

    path = Path(args.file)
    fmt = args.format or detect_format(path)
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0}
    reasons: list[str] = []
    progress = Progress(path.stat().st_size)  # noqa: ASYNC240 - a one-shot CLI read

    async with core(config) as cp:
        with path.open("rb") as stream:  # noqa: ASYNC230 - lines are read between awaits
            batch: list[Any] = []
            lines: list[int] = []

            async def flush() -> None:
                try:
                    if args.dry_run:
                        events, dupes = cp.ingestor.prepare(batch, args.source)
                        totals["accepted"] += len(events)
                        totals["duplicates"] += dupes
                    else:
                        result = await cp.ingest(batch, args.source)
                        totals["accepted"] += result.accepted
                        totals["duplicates"] += result.duplicates
                except InvalidInput as exc:
                    totals["rejected"] += len(batch)
                    for p in exc.problems:
                        where = f"line {lines[p.index]}" if p.index is not None else "batch"
                        reasons.append(f"{where}: {p.field or 'event'}: {p.message}")
                batch.clear()
                lines.clear()
                progress.update(stream.tell(), sum(totals.values()))

            try:
                for line in read_lines(stream, fmt):
                    batch.append(line.event)
                    lines.append(line.number)
                    if len(batch) >= args.batch_size:
                        await flush()
                if batch:
                    await flush()
            except InvalidInput as exc:
                reasons.append(exc.message)
                totals["rejected"] += len(batch)
        progress.update(progress.total, sum(totals.values()), final=True)
    if args.json:
        print_json({**totals, "dry_run": args.dry_run, "source": args.source, "errors": reasons})
        return 1 if totals["rejected"] else 0
    verb = "would accept" if args.dry_run else "accepted"
    print(
        f"events that name no source {'would be' if args.dry_run else 'were'} stored under "
        f"source {args.source!r}{' (as over HTTP)' if args.source == DEFAULT_SOURCE else ''}; "
        "duplicates are by (source, id): an event already stored under the same source and id "
        "is not stored again"
    )
    if args.dry_run:
        print("a dry run reads no stored events: its duplicates are those within the file")
    print(
        f"{verb} {totals['accepted']}, duplicates {totals['duplicates']}, "
        f"rejected {totals['rejected']} (batches with an invalid event store nothing)"
    )
    for reason in reasons[:50]:
        print(f"  {reason}")
    if len(reasons) > 50:
        print(f"  ... and {len(reasons) - 50} more")
    return 1 if totals["rejected"] else 0
