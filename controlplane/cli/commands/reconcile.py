"""`controlplane reconcile`: the ledger's sent rows against the provider's own aggregates."""

from __future__ import annotations

import argparse

from controlplane.cli.common import (
    Subparsers,
    core,
    json_option,
    print_json,
    print_table,
    unix_time,
    when,
)
from controlplane.config import Config
from controlplane.errors import InvalidInput
from controlplane.interfaces import ReconcileRun
from controlplane.reconcile import clean_since, run_api


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = json_option(
        sub.add_parser(
            "reconcile",
            parents=[common],
            help="compare sent usage with the provider's hourly aggregates; exit 1 on findings",
        )
    )
    at = "unix seconds or RFC 3339, on an hour boundary"
    p.add_argument(
        "--from",
        dest="start",
        type=unix_time,
        help=f"{at} (default: the window "
        "of a scheduled pass, [reconcile] window_hours up to the last settled hour)",
    )
    p.add_argument("--to", dest="end", type=unix_time, help=at)
    p.add_argument("--org", help="one org's rows only")
    p.add_argument("--runs", action="store_true", help="list the stored runs instead")
    p.set_defaults(func=reconcile)


async def reconcile(args: argparse.Namespace, config: Config) -> int:
    async with core(config, readonly=args.runs) as cp:
        if args.runs:
            runs = await cp.reconcile_runs()
            since = clean_since(runs)
            if args.json:
                print_json({"clean_since": since, "runs": [run_api(r) for r in runs]})
                return 0
            print(f"reconciled clean since {when(since)}")
            rows = [["checked", "from", "to", "status", "short", "over"]]
            for r in runs:
                status = "clean" if r.clean else "mismatch"
                rows.append(
                    [
                        when(r.checked_at),
                        when(r.start),
                        when(r.end),
                        status,
                        str(r.units_short),
                        str(r.units_over),
                    ]
                )
            if runs:
                print_table(rows)
            return 0
        if args.start is None and args.end is None and args.org is None:
            run = await cp.reconcile_pass()
        else:
            if args.start is None or args.end is None:
                raise InvalidInput("--from and --to: give both, or neither")
            run = await cp.reconcile(args.start, args.end, org_id=args.org)
    if args.json:
        print_json(run_api(run))
    else:
        show(run)
    return 0 if run.clean else 1


def show(run: ReconcileRun) -> None:
    if run.findings:
        rows = [["org", "customer", "meter", "hour", "ledger", "provider", "status"]]
        for f in run.findings:
            rows.append(
                [
                    f.org_id or "-",
                    f.customer,
                    f.meter,
                    when(f.hour),
                    str(f.ledger),
                    str(f.provider),
                    f.status,
                ]
            )
        print_table(rows)
        print()
    verdict = "clean" if run.clean else "MISMATCH"
    print(
        f"[{when(run.start)}, {when(run.end)}): {run.customers} customer meters, {run.hours} "
        f"org-hours compared; {run.units_short} units short at the provider (under billing), "
        f"{run.units_over} over (double billing): {verdict} (run {run.id})"
    )
