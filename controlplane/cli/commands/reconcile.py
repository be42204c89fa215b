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
    actions = p.add_subparsers(dest="action", metavar="{repair}")
    r = json_option(
        actions.add_parser(
            "repair",
            parents=[common],
            help="re-issue the rows the provider lacks and cancel what it holds twice "
            "(shows what it would do; --apply does it)",
        )
    )
    r.add_argument("--apply", action="store_true", help="do it (audited); without: a preview")
    r.add_argument("--actor", default="cli", help="who, for the audit log (default: cli)")
    r.set_defaults(func=repair)


async def reconcile(args: argparse.Namespace, config: Config) -> int:
    async with core(config, readonly=args.runs) as cp:
        if args.runs:
            runs = await cp.reconciler.runs()
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
            run = await cp.reconciler.scheduled()
        else:
            if args.start is None or args.end is None:
                raise InvalidInput("--from and --to: give both, or neither")
            run = await cp.reconciler.run(args.start, args.end, org_id=args.org)
    if args.json:
        print_json(run_api(run))
    else:
        show(run)
    return 0 if run.clean else 1


def show(run: ReconcileRun) -> None:
    if run.findings:
        rows = [["org", "customer", "meter", "hour", "ledger", "provider", "status", "remedy"]]
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
                    f.remedy,
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


async def repair(args: argparse.Namespace, config: Config) -> int:
    async with core(config, readonly=not args.apply) as cp:
        done = await cp.reconciler.repair(apply=args.apply, actor=args.actor)
    if args.json:
        print_json(done)
        return 0
    verb = "re-issued" if done.applied else "would re-issue"
    print(f"{verb} {len(done.reissued)} rows missing at the provider", end="")
    print(f" as {', '.join(done.reissued_as)}" if done.reissued_as else "")
    if done.repaired_before:
        print(f"run {done.run_id}: its cancels were made by an earlier repair")
    elif done.applied:
        print(f"cancelled again at the provider: {len(done.cancelled)}", end="")
        print(
            f"; refused (for a credit note): {', '.join(done.not_cancelled)}"
            if done.not_cancelled
            else ""
        )
    else:
        print(f"would cancel again at the provider: {len(done.cancelled)}")
    if done.credit_notes:
        print(f"\nfor a credit note (run {done.run_id}):")
        rows = [["org", "customer", "meter", "hour", "units over"]]
        for f in done.credit_notes:
            rows.append(
                [f.org_id or "-", f.customer, f.meter, when(f.hour), str(f.provider - f.ledger)]
            )
        print_table(rows)
    if not done.applied:
        print("\nnothing changed: run with --apply to repair")
    return 0
