"""`controlplane`: the command line, a thin shell over the core.

Every command takes ``--config`` (default ``./controlplane.toml`` when present, else the
shipped ``config.example.toml``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from controlplane import config as config_mod
from controlplane.config import Config
from controlplane.errors import ControlPlaneError, InvalidInput
from controlplane.events import DEFAULT_SOURCE

Handler = Callable[[argparse.Namespace, Config], Awaitable[int]]


def _print_json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2, default=str))


def _core(config: Config, migrate: bool = True) -> Any:
    from controlplane.core import ControlPlane

    return ControlPlane(config, migrate=migrate)


# serve / migrate ----------------------------------------------------------------------------


def serve(args: argparse.Namespace, config: Config) -> int:
    import uvicorn

    from controlplane.http.app import create_app

    if args.no_migrate:
        config = msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, migrate_on_start=False)
        )
    host = args.host or config.server.host
    port = args.port or config.server.port
    plane = _core(config, migrate=config.server.migrate_on_start)
    app = create_app(config, cp=plane, started=True, scheduler=not args.no_scheduler)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
    )

    async def run() -> None:
        # Started here, not in the app's lifespan: a control plane that cannot start (storage
        # unreachable, a bad plugin setting) is one line on stderr, as for every command.
        async with plane:
            await plane.start_ingest()  # the [[ingest]] consumers, closed before storage
            print(
                f"control plane listening on http://{host}:{port} (config {config.source})",
                file=sys.stderr,
            )
            with _sigterm_after_uvicorn_ignored():
                await server.serve()

    asyncio.run(run())
    return 0


@contextlib.contextmanager
def _sigterm_after_uvicorn_ignored() -> Iterator[None]:
    """uvicorn stops on SIGTERM, then raises it again once its own handler is gone: with the
    default handler that would end the process before the control plane closes. Signals
    reach the main thread only; elsewhere there is nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def migrate(args: argparse.Namespace, config: Config) -> int:
    from controlplane.registry import spec_for

    storage = spec_for("storage", config.storage_backend).factory(config.storage)
    await storage.start()
    try:
        applied = await storage.migrate()
        status = await storage.migration_status()
    finally:
        await storage.close()
    print(f"applied: {', '.join(applied) or 'nothing'}; schema at {status.applied[-1]}")
    return 0


# ingest -----------------------------------------------------------------------------------


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

    async with _core(config) as cp:
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


# jobs -------------------------------------------------------------------------------------


async def rollup(args: argparse.Namespace, config: Config) -> int:
    async with _core(config) as cp:
        stats = await cp.record("rollup", lambda: cp.rollup(until=args.until))
    _print_json(stats)
    return 0


async def send(args: argparse.Namespace, config: Config) -> int:
    async with _core(config) as cp:
        stats = await cp.record("send", cp.send)
    _print_json(stats)
    return 0


async def demo(args: argparse.Namespace, config: Config) -> int:
    from controlplane import demo as demo_mod

    async with _core(config) as cp:
        await demo_mod.run(cp, hours=args.hours, cutover=args.cutover)
    return 0


# orgs, flags, tokens ------------------------------------------------------------------------


async def orgs(args: argparse.Namespace, config: Config) -> int:
    async with _core(config) as cp:
        if args.action == "set":
            update = await cp.set_org(
                args.org,
                customer=args.customer,
                plan=args.plan,
                actor=args.actor,
                effective_from=args.effective_from,
                reason=args.reason,
                force=args.force,
            )
            for note in update.notes:
                print(f"note: {note}", file=sys.stderr)
            org = update.org
        else:
            org = await cp.storage.get_org(args.org)
            if org is None:
                print(f"no org {args.org!r}", file=sys.stderr)
                return 1
    _print_json(org)
    return 0


async def audit_cmd(args: argparse.Namespace, config: Config) -> int:
    if args.action == "keygen":
        from controlplane.audit import new_ed25519_key

        private, public = new_ed25519_key()
        print("# [audit] for the control plane (keep `key` secret, e.g. in an env variable):")
        print('algorithm = "ed25519"')
        print(f'key = "{private}"')
        print(f'public_key = "{public}"  # auditors need only this one')
        return 0
    signed_from = args.signed_from or config.audit.signed_from
    async with _core(config) as cp:
        signed = ""
        if cp.audit_keys:
            signed = f" (signed from record {signed_from})" if signed_from else " (all signed)"

        def progress(done: int) -> None:
            print(f"  {done:,} records verified", file=sys.stderr)

        checked, broken = await cp.verify_audit(
            progress if sys.stderr.isatty() else None, signed_from=signed_from
        )
    if broken is None:
        print(f"audit chain intact: {checked:,} records{signed}")
        return 0
    print(f"audit chain BROKEN at record {broken.id}: {broken.reason}")
    print(f"  ({checked:,} records before it hold)")
    return 1


async def flags(args: argparse.Namespace, config: Config) -> int:
    from controlplane.flags import FlagChange

    async with _core(config) as cp:
        if args.action == "set":
            snapshot = await cp.set_flags(
                [FlagChange(name=args.name, value=args.value)],
                actor=args.actor,
                reason=args.reason,
                force=args.force,
            )
            _print_json(snapshot.to_api())
        elif args.action == "audit":
            records = await cp.storage.audit_log(action_prefix="flag.", limit=args.limit)
            for r in records:
                forced = " (forced)" if r.forced else ""
                print(
                    f"{r.at}  {r.subject}: {r.before!r} -> {r.after!r}  by {r.actor}{forced}: "
                    f"{r.reason}"
                )
        else:
            snapshot = await cp.flags()
            for name, v in snapshot.values.items():
                value = v.value.value if hasattr(v.value, "value") else v.value
                print(f"{name:<10} {json.dumps(value):<14} source={v.source} version={v.version}")
            print(f"legacy_bill_until {json.dumps(snapshot.legacy_bill_until)}")
    return 0


def token(args: argparse.Namespace, config: Config | None) -> int:
    from controlplane.auth import create_token

    secret, lines = create_token(
        args.name, [s.strip() for s in args.scopes.split(",") if s.strip()]
    )
    print(f"token (shown once, store it now): {secret}\n")
    print("add to your config:\n")
    print(lines)
    return 0


# parity -----------------------------------------------------------------------------------


def _unix(text: str) -> int:
    """Unix seconds, or an RFC 3339 time with an offset (`2026-01-01T00:00:00Z`)."""
    import datetime as dt

    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected unix seconds or RFC 3339") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give an offset, e.g. Z")
    return int(when.timestamp())


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


async def parity(args: argparse.Namespace, config: Config) -> int:
    from controlplane.parity import comparison_api, run_api

    async with _core(config) as cp:
        if args.action == "checker":
            stats = await cp.record("parity", cp.parity_check)
            _print_json(stats)
            return 0
        if args.action == "runs":
            runs = await cp.storage.parity_runs(config.parity.meter, limit=args.limit)
            clean = await cp.parity_clean_since()
            print(f"clean since: {clean.since} (buckets {clean.buckets}, up to {clean.until})")
            for run in runs:
                r = run_api(run)
                print(
                    f"{r['bucket_start']}  {r['status']:<8}  orgs {r['orgs']}  mismatches "
                    f"{r['mismatches']}  alarming {str(r['alarming']).lower()}  totals "
                    f"{r['totals']['controlplane']} vs {r['totals']['legacy']}"
                )
            return 0
        comparison = await cp.parity(args.start, args.end)
    report = comparison_api(comparison, mismatches_only=not args.all)
    summary = report["summary"]
    rows = [["org", "controlplane", "legacy", "drift", "relative", "ok"]]
    for org in report["orgs"]:
        ok = org["within_tolerance"]
        rows.append(
            [
                org["org_id"],
                org["controlplane"] or "-",
                org["legacy"] or "-",
                org["drift"] or "-",
                org["relative_drift"] or ("-" if org["legacy"] is None else "inf"),
                "-" if ok is None else ("yes" if ok else "NO"),
            ]
        )
    if len(rows) > 1:
        _table(rows)
        print()
    totals = summary["totals"]
    worst = summary["worst"]
    print(
        f"{comparison.meter} [{comparison.start}, {comparison.end}): {summary['orgs']} orgs, "
        f"{summary['mismatches']} mismatches (tolerance {report['tolerance']}); totals: "
        f"control plane {totals['controlplane']}, legacy {totals['legacy'] or '-'}"
        + (f"; worst {worst['org_id']} ({worst['relative_drift'] or 'inf'})" if worst else "")
    )
    status = summary["status"]
    print(f"status: {status}")
    if status == "no_legacy":
        print("no legacy source is configured ([legacy]): nothing was compared", file=sys.stderr)
        return 3
    return 1 if status == "mismatch" else 0


# catalog ----------------------------------------------------------------------------------


async def catalog(args: argparse.Namespace, config: Config) -> int:
    from controlplane.catalog import catalog_api

    async with _core(config) as cp:
        if args.action == "show":
            found = await cp.storage.catalog_version(args.version)
            if found is None:
                missing = "no catalog version is published"
                if args.version is not None:
                    missing = f"no catalog version {args.version}"
                print(missing, file=sys.stderr)
                return 1
            _print_json(catalog_api(found))
            return 0
        result = await cp.catalog_publish(actor=args.actor, dry_run=args.dry_run)
    for action in result.actions:
        print(f"{action.kind:<10} {action.what:<8} {action.key:<24} {action.detail}".rstrip())
    version = result.version.version if result.version else None
    if result.dry_run:
        print(f"dry run: nothing changed at Stripe or in storage (current version {version})")
    elif result.changed:
        print(f"published catalog version {version}")
    else:
        print(f"unchanged: catalog version {version} is current")
    return 0


# cutover ----------------------------------------------------------------------------------


async def cutover_cmd(args: argparse.Namespace, config: Config) -> int:

    async with _core(config) as cp:
        if args.action == "plan":
            plan = await cp.cutover.plan(args.at)
            print(f"cutover at T = {plan.at} (now {plan.now})")
            print("now:   " + "\n       ".join(plan.before))
            print("after: " + "\n       ".join(plan.after))
            for change in plan.changes:
                print(f"change: {change.flag} {change.before!r} -> {change.after!r}")
            print(
                f"pending rows at or after T (sent after execute): {plan.pending_from_t}; "
                f"before T (excluded, the legacy biller bills them): {plan.pending_before_t}"
            )
            for problem in plan.problems:
                print(f"problem: {problem['rule']}: {problem['message']}")
            return 1 if plan.problems else 0
        if args.action == "preflight":
            report = await cp.cutover.preflight(args.at)
            for check in report.checks:
                print(f"{check.status.upper():<5} {check.name:<26} {check.detail}")
            print(f"preflight for T = {report.at}: {'ready' if report.ok else 'NOT ready'}")
            return 0 if report.ok else 1
        if args.action == "execute":
            report, snapshot = await cp.cutover.execute(
                args.at, actor=args.actor, reason=args.reason, force=args.force
            )
            for check in report.checks:
                print(f"{check.status.upper():<5} {check.name:<26} {check.detail}")
            print(
                f"executed: authority=controlplane, bill_from={snapshot.bill_from}, "
                f"shadow=false; legacy_bill_until={snapshot.legacy_bill_until}"
            )
            return 0
        if args.action == "rollback":
            result = await cp.cutover.rollback(
                actor=args.actor, reason=args.reason, cancel_sent=args.cancel_sent
            )
            print("rolled back: authority=legacy, shadow=true")
            for row in result.cancelled:
                print(f"cancelled      {row.identifier}  {row.quantity} units ({row.value})")
            for row in result.not_cancelled:
                print(
                    f"NOT cancelled  {row.identifier}  {row.quantity} units ({row.value}) "
                    f"sent_at={row.sent_at}: {row.note} -> issue a credit note"
                )
            if result.senders_still_running:
                print(f"WARNING: {result.senders_still_running}")
                return 1
            return 0
        status = await cp.cutover.status()
        print(f"stage: {status.stage}")
        print(f"legacy_bill_until: {json.dumps(status.flags['legacy_bill_until'])}")
        for entry in status.history:
            forced = " (forced)" if entry["forced"] else ""
            print(
                f"{entry['at']}  {entry['step']:<8} T={json.dumps(entry['t'])}  "
                f"by {entry['actor']}{forced}: {entry['reason']}"
            )
    return 0


# parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="config file (default: ./controlplane.toml, else config.example.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the HTTP API and the scheduled jobs")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations")
    p.add_argument("--no-scheduler", action="store_true", help="do not run rollup and send jobs")
    p.set_defaults(func=serve, sync=True)

    p = sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    p.set_defaults(func=migrate)

    p = sub.add_parser(
        "ingest", parents=[common], help="backfill events from an NDJSON or CSV file"
    )
    p.add_argument("file")
    p.add_argument("--format", choices=["ndjson", "csv"])
    p.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"source for events that name none (default: {DEFAULT_SOURCE}, as over HTTP: "
        "events are deduplicated by (source, id), so a backfill of events that also came in "
        "live finds them duplicates; for events that came from an [[ingest]] stream, give "
        "that table's `source`)",
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--dry-run", action="store_true", help="validate and report; store nothing")
    p.set_defaults(func=ingest)

    p = sub.add_parser("rollup", parents=[common], help="roll up closed buckets into the ledger")
    p.add_argument("--until", type=int, help="treat buckets ending at or before T as closed")
    p.set_defaults(func=rollup)

    p = sub.add_parser(
        "send", parents=[common], help="deliver pending ledger rows (when flags allow)"
    )
    p.set_defaults(func=send)

    p = sub.add_parser("orgs", parents=[common], help="org customers and plans")
    osub = p.add_subparsers(dest="action", required=True)
    o = osub.add_parser("set", parents=[common])
    o.add_argument("org")
    o.add_argument("--customer")
    o.add_argument("--plan")
    o.add_argument("--effective-from", type=int, help="unix seconds (default: now)")
    o.add_argument("--reason")
    o.add_argument("--actor", default="cli")
    o.add_argument(
        "--force",
        action="store_true",
        help="start a plan before buckets already rolled up (they keep the plan they had)",
    )
    o = osub.add_parser("show", parents=[common])
    o.add_argument("org")
    p.set_defaults(func=orgs)

    p = sub.add_parser("flags", parents=[common], help="cutover flags")
    fsub = p.add_subparsers(dest="action", required=True)
    fsub.add_parser("list", parents=[common])
    f = fsub.add_parser("set", parents=[common])
    f.add_argument("name")
    f.add_argument("value")
    f.add_argument("--reason", required=True)
    f.add_argument("--force", action="store_true")
    f.add_argument("--actor", default="cli")
    f = fsub.add_parser("audit", parents=[common])
    f.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=flags)

    p = sub.add_parser("cutover", parents=[common], help="plan, check, execute, roll back")
    xsub = p.add_subparsers(dest="action", required=True)
    xsub.add_parser("status", parents=[common], help="the stage and its history")
    x = xsub.add_parser("plan", parents=[common], help="who bills what before and after T")
    x.add_argument("--at", type=_unix, required=True, help="T: unix seconds or RFC 3339")
    x = xsub.add_parser("preflight", parents=[common], help="every precondition; exit 1 on fail")
    x.add_argument("--at", type=_unix, help="T (default: the current bill_from)")
    x = xsub.add_parser("execute", parents=[common], help="preflight, then flip the flags")
    x.add_argument("--at", type=_unix, help="T (default: the current bill_from)")
    x.add_argument("--reason", required=True)
    x.add_argument("--force", action="store_true", help="execute despite failed checks")
    x.add_argument("--actor", default="cli")
    x = xsub.add_parser("rollback", parents=[common], help="authority back to legacy")
    x.add_argument("--reason", required=True)
    x.add_argument(
        "--cancel-sent", action="store_true", help="cancel at the provider rows sent < 24 h ago"
    )
    x.add_argument("--actor", default="cli")
    p.set_defaults(func=cutover_cmd)

    p = sub.add_parser("audit", parents=[common], help="the tamper-evident audit chain")
    asub = p.add_subparsers(dest="action", required=True)
    v = asub.add_parser(
        "verify", parents=[common], help="walk the chain; exit 1 at the first broken link"
    )
    v.add_argument(
        "--signed-from",
        type=int,
        metavar="ID",
        help="records before this id may be unsigned (default: [audit] signed_from)",
    )
    asub.add_parser("keygen", parents=[common], help="print a new Ed25519 key pair for [audit]")
    p.set_defaults(func=audit_cmd)

    p = sub.add_parser("token", parents=[common], help="API tokens")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("create", parents=[common])
    t.add_argument("--name", required=True)
    t.add_argument("--scopes", default="ingest,read")
    p.set_defaults(func=token, sync=True, no_config=True)

    p = sub.add_parser(
        "demo", parents=[common], help="a guided first run against the Stripe emulator"
    )
    p.add_argument("--hours", type=int, default=3, help="hours of sample usage (default 3)")
    p.add_argument("--cutover", action="store_true", help="flip the flags and send")
    p.set_defaults(func=demo)

    p = sub.add_parser("parity", parents=[common], help="usage parity with the legacy biller")
    psub = p.add_subparsers(dest="action", required=True)
    c = psub.add_parser("check", parents=[common], help="compare a window; exit 1 on mismatch")
    c.add_argument("--from", dest="start", type=_unix, required=True, help="unix seconds")
    c.add_argument("--to", dest="end", type=_unix, required=True, help="unix seconds")
    c.add_argument("--all", action="store_true", help="list every org, not only mismatches")
    psub.add_parser("checker", parents=[common], help="one pass of the scheduled checker")
    r = psub.add_parser("runs", parents=[common], help="the checker's runs and clean-since")
    r.add_argument("--limit", type=int, default=24)
    p.set_defaults(func=parity)

    p = sub.add_parser("catalog", parents=[common], help="the price catalog at Stripe")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("publish", parents=[common], help="make Stripe match [catalog]")
    c.add_argument(
        "--dry-run", action="store_true", help="read Stripe, print the plan, change nothing"
    )
    c.add_argument("--actor", default="cli")
    c = csub.add_parser("show", parents=[common], help="a published catalog version")
    c.add_argument("--version", type=int, help="default: the newest")
    p.set_defaults(func=catalog)

    # handled by controlplane.stripe_emulator.main, which owns its options (see main below)
    sub.add_parser("stripe-emulator", help="run the local Stripe emulator (--help for options)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stripe-emulator"]:
        from controlplane import stripe_emulator

        return stripe_emulator.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "no_config", False):
            return int(args.func(args, None))
        config = config_mod.load(args.config)
        from controlplane.logs import configure

        configure(config.logging)
        if getattr(args, "sync", False):
            return int(args.func(args, config))
        return int(asyncio.run(args.func(args, config)))
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
