"""`controlplane parity`: usage parity with the legacy biller (a window, the checker, its runs)
and money parity (`parity money`: what each biller would invoice for a billing period)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

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
    m = json_option(
        psub.add_parser(
            "money",
            parents=[common],
            help="invoice amounts per org for a billing period; exit 1 on mismatch",
        )
    )
    m.add_argument("--period", help="YYYY-MM (UTC month)")
    m.add_argument(
        "--from", dest="start", type=unix_time, help="unix seconds or RFC 3339 (with --to)"
    )
    m.add_argument(
        "--to", dest="end", type=unix_time, help="unix seconds or RFC 3339 (with --from)"
    )
    m.add_argument("--lines", action="store_true", help="each org's invoice lines too")
    p.set_defaults(func=parity)


async def parity(args: argparse.Namespace, config: Config) -> int:
    from controlplane.parity import comparison_api, run_api

    if args.action == "money":
        return await money(args, config)
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


async def money(args: argparse.Namespace, config: Config) -> int:
    from controlplane.money import amount, comparison_api, period_of

    async with core(config) as cp:
        start, end = period_of(args.period, args.start, args.end, config.rollup.bucket_seconds)
        comparison, run_id = await cp.money_parity.check(start, end)
    report = comparison_api(comparison, lines=args.lines, run_id=run_id)
    status = report["summary"]["status"]
    if args.json:
        print_json(report)
    else:
        _money_table(report, amount)
    if status == "no_legacy":
        print("no legacy invoices to compare with: see the notes", file=sys.stderr)
        return 3
    return 1 if status == "mismatch" else 0


def _money_table(report: dict[str, Any], amount: Callable[[int, str], str]) -> None:
    currency = report["currency"]

    def money(minor: int | None) -> str:
        return "-" if minor is None else amount(minor, currency)

    rows = [["org", "controlplane", "legacy", "drift", "drift %", "ok", "stripe", "finding"]]
    for org in report["orgs"]:
        ok = org["within_tolerance"]
        stripe = org["stripe"]
        rows.append(
            [
                org["org_id"],
                money(org["controlplane_minor"]),
                money(org["legacy_minor"]),
                money(org["drift_minor"]),
                org["drift_percent"] or ("-" if org["legacy_minor"] is None else "inf"),
                "-" if ok is None else ("yes" if ok else "NO"),
                "-" if stripe is None else money(stripe["subtotal_minor"]),
                "-" if stripe is None else ("YES" if stripe["finding"] else "no"),
            ]
        )
    if len(rows) > 1:
        print_table(rows)
        print()
    for org in report["orgs"]:
        lines = org.get("lines")
        if not lines:
            continue
        print(f"{org['org_id']}:")
        for line in lines["controlplane"]:
            print(
                f"  controlplane  {line['price']}: {line['quantity']} x "
                f"{line['unit_amount_decimal']} = {money(line['amount_minor'])}"
                + (f" (credit {money(line['credit_minor'])})" if line["credit_minor"] else "")
            )
        for line in lines["legacy"] or ():
            print(f"  legacy        {line['description']}: {money(line['amount_minor'])}")
        for line in lines["stripe"] or ():
            print(
                f"  stripe        {line['price']}: {line['quantity']} = "
                f"{money(line['amount_minor'])}"
            )
    summary = report["summary"]
    totals = summary["totals"]
    print(
        f"[{report['from']}, {report['to']}) {currency}: {summary['orgs']} orgs, "
        f"{summary['mismatches']} mismatches (tolerance {report['tolerance']}), "
        f"{summary['only_controlplane']} only on the control plane, {summary['only_legacy']} "
        f"only legacy, {summary['stripe_findings']} Stripe findings; totals: control plane "
        f"{money(totals['controlplane_minor'])}, legacy {money(totals['legacy_minor'])}"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print("taxes, discounts and proration are not priced")
    print(f"status: {summary['status']} (run {report['run_id']})")
