"""`controlplane cutover`: status, plan, preflight, execute and roll back the cutover."""

from __future__ import annotations

import argparse
import json

from controlplane.cli.common import Subparsers, core, unix_time
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cutover", parents=[common], help="plan, check, execute, roll back")
    xsub = p.add_subparsers(dest="action", required=True)
    xsub.add_parser("status", parents=[common], help="the stage and its history")
    x = xsub.add_parser("plan", parents=[common], help="who bills what before and after T")
    x.add_argument("--at", type=unix_time, required=True, help="T: unix seconds or RFC 3339")
    x = xsub.add_parser("preflight", parents=[common], help="every precondition; exit 1 on fail")
    x.add_argument("--at", type=unix_time, help="T (default: the current bill_from)")
    x = xsub.add_parser("execute", parents=[common], help="preflight, then flip the flags")
    x.add_argument("--at", type=unix_time, help="T (default: the current bill_from)")
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


async def cutover_cmd(args: argparse.Namespace, config: Config) -> int:
    async with core(config) as cp:
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
