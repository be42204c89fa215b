"""`controlplane orgs`: an org's customer and plans."""

from __future__ import annotations

import argparse
import sys

from controlplane.cli.common import Subparsers, core, print_json
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
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


async def orgs(args: argparse.Namespace, config: Config) -> int:
    async with core(config) as cp:
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
                print(f"no org {args.org!r}", file=sys.stderr)
                return 1
            org = found
    print_json(org)
    return 0
