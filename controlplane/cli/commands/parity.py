"""`controlplane parity`: usage parity with the legacy biller (a window, the checker, its runs)."""

from __future__ import annotations

import argparse
import sys

from controlplane.cli.common import (
    Subparsers,
    core,
    json_option,
    print_counts,
    print_json,
    print_table,
    text,
    unix_time,
    when,
)
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("parity", parents=[common], help="usage parity with the legacy biller")
    psub = p.add_subparsers(dest="action", required=True)
    c = json_option(
        psub.add_parser("check", parents=[common], help="compare a window; exit 1 on mismatch")
    )
    window = "unix seconds or RFC 3339, aligned to a bucket"
    c.add_argument("--from", dest="start", type=unix_time, required=True, help=window)
    c.add_argument("--to", dest="end", type=unix_time, required=True, help=window)
    c.add_argument("--all", action="store_true", help="list every org, not only mismatches")
    json_option(
        psub.add_parser("checker", parents=[common], help="one pass of the scheduled checker")
    )
    r = json_option(
        psub.add_parser("runs", parents=[common], help="the checker's runs and clean-since")
    )
    r.add_argument("--limit", type=int, default=24, help="newest N runs (default 24)")
    p.set_defaults(func=parity)


async def parity(args: argparse.Namespace, config: Config) -> int:
    from controlplane.parity import comparison_api, run_api

    async with core(config, readonly=args.action != "checker") as cp:
        if args.action == "checker":
            stats = await cp.record("parity", cp.parity_check)
            print_counts(stats, as_json=args.json)
            return 0
        if args.action == "runs":
            runs = [run_api(run) for run in await cp.parity_runs(limit=args.limit)]
            clean = await cp.parity_clean_since()
            if args.json:
                print_json({"clean_since": clean, "runs": runs})
                return 0
            print(
                f"clean since {when(clean.since)} ({clean.buckets} buckets, checked up to "
                f"{when(clean.until)})"
            )
            if runs:
                rows = [["bucket", "status", "orgs", "mismatches", "alarming", "cp", "legacy"]]
                for r in runs:
                    rows.append(
                        [
                            when(r["bucket_start"]),
                            r["status"],
                            str(r["orgs"]),
                            str(r["mismatches"]),
                            text(r["alarming"]),
                            r["totals"]["controlplane"],
                            text(r["totals"]["legacy"]),
                        ]
                    )
                print_table(rows)
            return 0
        comparison = await cp.parity(args.start, args.end)
    report = comparison_api(comparison, mismatches_only=not args.all)
    if args.json:
        print_json(report)
        return {"no_legacy": 3, "mismatch": 1}.get(report["summary"]["status"], 0)
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
        f"{comparison.meter} [{when(comparison.start)}, {when(comparison.end)}): "
        f"{summary['orgs']} orgs, "
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
