"""`controlplane catalog`: publish `[catalog]` to Stripe; show a published version."""

from __future__ import annotations

import argparse
import sys

from controlplane.cli.common import Subparsers, core, print_json
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
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


async def catalog(args: argparse.Namespace, config: Config) -> int:
    from controlplane.plugins.billing.stripe.catalog import catalog_api

    async with core(config) as cp:
        if args.action == "show":
            found = await cp.catalog(args.version)
            if found is None:
                missing = "no catalog version is published"
                if args.version is not None:
                    missing = f"no catalog version {args.version}"
                print(missing, file=sys.stderr)
                return 1
            print_json(catalog_api(found))
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
