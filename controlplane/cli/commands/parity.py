"""`controlplane parity`: usage parity with the legacy biller (a window, the checker, its runs)."""

from __future__ import annotations

import argparse
import sys

from controlplane.cli.common import Subparsers, core, print_json, print_table, unix_time
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("parity", parents=[common], help="usage parity with the legacy biller")
    psub = p.add_subparsers(dest="action", required=True)
    c = psub.add_parser("check", parents=[common], help="compare a window; exit 1 on mismatch")
    c.add_argument("--from", dest="start", type=unix_time, required=True, help="unix seconds")
    c.add_argument("--to", dest="end", type=unix_time, required=True, help="unix seconds")
    c.add_argument("--all", action="store_true", help="list every org, not only mismatches")
    psub.add_parser("checker", parents=[common], help="one pass of the scheduled checker")
    r = psub.add_parser("runs", parents=[common], help="the checker's runs and clean-since")
    r.add_argument("--limit", type=int, default=24)
    p.set_defaults(func=parity)


async def parity(args: argparse.Namespace, config: Config) -> int:
    from controlplane.parity import comparison_api, run_api

    async with core(config) as cp:
        if args.action == "checker":
            stats = await cp.record("parity", cp.parity_check)
            print_json(stats)
            return 0
        if args.action == "runs":
            runs = await cp.parity_runs(limit=args.limit)
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
        print_table(rows)
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
