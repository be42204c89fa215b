"""`controlplane orgs`: an org's customer and plans."""

from __future__ import annotations

import argparse
import sys

from controlplane.cli.common import (
    Subparsers,
    core,
    json_option,
    print_fields,
    print_json,
    print_table,
    unix_time,
    when,
)
from controlplane.config import Config
from controlplane.interfaces import Org


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("orgs", parents=[common], help="org customers and plans")
    osub = p.add_subparsers(dest="action", required=True)
    o = json_option(
        osub.add_parser("set", parents=[common], help="set an org's customer and/or plan")
    )
    o.add_argument("org", help="the org id")
    o.add_argument("--customer", help="its Stripe customer id (cus_...)")
    o.add_argument("--plan", help="a plan of [[plans]] (default: free and pro)")
    o.add_argument(
        "--effective-from",
        type=unix_time,
        help="when the plan starts: unix seconds or RFC 3339 (default: now)",
    )
    o.add_argument("--reason", help="why, for the audit log")
    o.add_argument("--actor", default="cli", help="who, for the audit log (default: cli)")
    o.add_argument(
        "--force",
        action="store_true",
        help="start a plan before buckets already rolled up (they keep the plan they had)",
    )
    o = json_option(osub.add_parser("show", parents=[common], help="an org and its plans"))
    o.add_argument("org", help="the org id")
    p.set_defaults(func=orgs)


async def orgs(args: argparse.Namespace, config: Config) -> int:
    async with core(config, readonly=args.action == "show") as cp:
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
            found = await cp.org(args.org)
            if found is None:
                print(f"error: no org {args.org!r}", file=sys.stderr)
                return 1
            org = found
    if args.json:
        print_json(org)
    else:
        show(org)
    return 0


def show(org: Org) -> None:
    print_fields(
        [
            ("org", org.org_id),
            ("customer", org.customer),
            ("subscription", org.subscription),
            ("subscription status", org.subscription_status),
            ("updated", when(org.updated_at)),
        ]
    )
    if org.plans:
        print()
        print_table(
            [["plan", "effective from"]]
            + [[p.plan, f"{when(p.effective_from)} ({p.effective_from})"] for p in org.plans]
        )
