"""`controlplane cutover`: status, plan, preflight, execute and roll back the cutover."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from controlplane.cli.common import (
    Subparsers,
    core,
    flag_text,
    json_option,
    print_json,
    print_table,
    unix_time,
    when,
)
from controlplane.config import Config

if TYPE_CHECKING:
    from controlplane.cutover import Preflight
    from controlplane.reversal import CreditNote, RowNote

AT = "T: unix seconds or RFC 3339 (2026-01-01T00:00:00Z)"


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cutover", parents=[common], help="plan, check, execute, roll back")
    xsub = p.add_subparsers(dest="action", required=True)
    json_option(xsub.add_parser("status", parents=[common], help="the stage and its history"))
    x = json_option(
        xsub.add_parser("plan", parents=[common], help="who bills what before and after T")
    )
    x.add_argument("--at", type=unix_time, required=True, help=AT)
    x = json_option(
        xsub.add_parser("preflight", parents=[common], help="every precondition; exit 1 on fail")
    )
    x.add_argument("--at", type=unix_time, help=f"{AT} (default: the current bill_from)")
    x = json_option(
        xsub.add_parser("execute", parents=[common], help="preflight, then flip the flags")
    )
    x.add_argument("--at", type=unix_time, help=f"{AT} (default: the current bill_from)")
    x.add_argument("--reason", required=True, help="why, for the audit log")
    x.add_argument("--force", action="store_true", help="execute despite failed checks")
    x.add_argument("--actor", default="cli", help="who, for the audit log (default: cli)")
    x = json_option(xsub.add_parser("rollback", parents=[common], help="authority back to legacy"))
    x.add_argument("--reason", required=True, help="why, for the audit log")
    x.add_argument(
        "--cancel-sent",
        action="store_true",
        help="hand back what the provider holds: cancel rows sent < 24 h ago, offset older "
        "ones in their open billing period, list the rest for credit notes",
    )
    x.add_argument(
        "--credit-notes",
        choices=["list", "create"],
        default="list",
        help="with --cancel-sent: 'create' issues the credit notes on the finalized invoices "
        "(and hands their usage back); default 'list'",
    )
    x.add_argument("--actor", default="cli", help="who, for the audit log (default: cli)")
    p.set_defaults(func=cutover_cmd)


async def cutover_cmd(args: argparse.Namespace, config: Config) -> int:
    async with core(config, readonly=args.action in ("status", "plan")) as cp:
        if args.action == "plan":
            plan = await cp.cutover.plan(args.at)
            if args.json:
                print_json(plan)
                return 1 if plan.problems else 0
            print(f"cutover at T = {when(plan.at)} ({plan.at}); now {when(plan.now)}")
            print("now:   " + "\n       ".join(plan.before))
            print("after: " + "\n       ".join(plan.after))
            for change in plan.changes:
                before, after = (flag_text(change.flag, v) for v in (change.before, change.after))
                print(f"change: {change.flag} {before} -> {after}")
            print(
                f"pending rows at or after T (sent after execute): {plan.pending_from_t}; "
                f"before T (excluded, the legacy biller bills them): {plan.pending_before_t}"
            )
            for problem in plan.problems:
                print(f"problem: {_refusal(problem['rule'], problem['message'])}")
            return 1 if plan.problems else 0
        if args.action == "preflight":
            report = await cp.cutover.preflight(args.at)
            if args.json:
                print_json(report)
            else:
                _checks(report)
                verdict = "ready" if report.ok else "NOT ready"
                print(f"preflight for T = {when(report.at)} ({report.at}): {verdict}")
            return 0 if report.ok else 1
        if args.action == "execute":
            report, snapshot = await cp.cutover.execute(
                args.at, actor=args.actor, reason=args.reason, force=args.force
            )
            if args.json:
                print_json({"preflight": report, "flags": snapshot.to_api()})
                return 0
            _checks(report)
            print(
                f"executed: authority controlplane, bill_from "
                f"{flag_text('bill_from', snapshot.bill_from)}, shadow no; legacy_bill_until "
                f"{flag_text('bill_from', snapshot.legacy_bill_until)}"
            )
            return 0
        if args.action == "rollback":
            result = await cp.cutover.rollback(
                actor=args.actor,
                reason=args.reason,
                cancel_sent=args.cancel_sent,
                create_credit_notes=args.credit_notes == "create",
            )
            if args.json:
                print_json(result)
            else:
                print("rolled back: authority legacy, shadow yes")
                _rows("cancelled at the provider", result.cancelled)
                _rows("offset in their open billing period", result.offset)
                _rows("credited on their invoice", result.credited)
                _rows("NOT handed back (still at the provider)", result.not_cancelled)
                _credit_notes(result.credit_notes)
                if result.senders_still_running:
                    print(f"WARNING: {result.senders_still_running}")
            return 1 if result.senders_still_running else 0
        status = await cp.cutover.status()
    if args.json:
        print_json(status)
        return 0
    print(f"stage: {status.stage}")
    print(f"legacy_bill_until: {flag_text('bill_from', status.flags['legacy_bill_until'])}")
    print(f"reconciled clean since: {when(status.reconciled_clean_since)}")
    if status.history:
        rows = [["at", "step", "T", "by", "forced", "reason"]]
        for e in status.history:
            forced = "yes" if e["forced"] else "no"
            rows.append(
                [when(e["at"]), e["step"], when(e["t"]), e["actor"], forced, e["reason"] or "-"]
            )
        print_table(rows)
    return 0


def _refusal(rule: str, message: str) -> str:
    """`rule: message`, once: a refusal's message may already start with its rule."""
    return message if message.startswith(rule) else f"{rule}: {message}"


def _checks(report: Preflight) -> None:
    print_table(
        [["check", "status", "detail"]]
        + [[c.name, c.status.upper(), c.detail] for c in report.checks],
    )


def _rows(title: str, rows: list[RowNote]) -> None:
    if not rows:
        return
    print(f"{title}:")
    table = [["identifier", "org", "meter", "bucket", "quantity", "value", "sent", "note"]]
    for r in rows:
        table.append(
            [
                r.identifier,
                r.org_id,
                r.meter,
                when(r.bucket_start),
                str(r.quantity),
                r.value,
                when(r.sent_at),
                r.note or "",
            ]
        )
    print_table(table)


def _credit_notes(notes: list[CreditNote]) -> None:
    if not notes:
        return
    print("credit notes (per customer, invoice and meter):")
    table = [["org", "customer", "invoice", "meter", "quantity", "rows", "amount", "issued"]]
    for c in notes:
        amount = "no price" if c.amount_minor is None else f"{c.amount_minor} {c.currency} minor"
        table.append(
            [
                c.org_id,
                c.customer or "-",
                c.invoice_id or "find it at Stripe",
                c.meter,
                str(c.quantity),
                str(c.rows),
                amount,
                c.issued or "to issue",
            ]
        )
    print_table(table)
