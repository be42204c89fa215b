"""`controlplane catalog`: publish `[catalog]` to Stripe; show a published version."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from controlplane.cli.common import (
    Subparsers,
    core,
    json_option,
    print_json,
    print_table,
    text,
    when,
)
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("catalog", parents=[common], help="the price catalog at Stripe")
    csub = p.add_subparsers(dest="action", required=True)
    c = json_option(
        csub.add_parser("publish", parents=[common], help="make Stripe match [catalog]")
    )
    c.add_argument(
        "--dry-run", action="store_true", help="read Stripe, print the plan, change nothing"
    )
    c.add_argument("--actor", default="cli", help="who, for the audit log (default: cli)")
    c = json_option(csub.add_parser("show", parents=[common], help="a published catalog version"))
    c.add_argument("--version", type=int, help="default: the newest")
    p.set_defaults(func=catalog)


async def catalog(args: argparse.Namespace, config: Config) -> int:
    async with core(config, readonly=args.action == "show") as cp:
        if args.action == "show":
            found = await cp.catalog(args.version)
            if found is None:
                missing = "no catalog version is published"
                if args.version is not None:
                    missing = f"no catalog version {args.version}"
                print(missing, file=sys.stderr)
                return 1
            if args.json:
                print_json(found)
            else:
                show(msgspec.to_builtins(found))
            return 0
        result = await cp.catalog_publish(actor=args.actor, dry_run=args.dry_run)
    if args.json:
        print_json(result)
        return 0
    if result.actions:
        print_table(
            [["action", "what", "key", "detail"]]
            + [[a.kind, a.what, a.key, a.detail] for a in result.actions]
        )
    version = result.version.version if result.version else None
    if result.dry_run:
        print(f"dry run: nothing changed at Stripe or in storage (current version {version})")
    elif result.changed:
        print(f"published catalog version {version}")
    else:
        print(f"unchanged: catalog version {version} is current")
    return 0


def show(api: dict[str, Any]) -> None:
    catalog = api["catalog"]
    print(f"catalog version {api['version']}, published {when(api['published_at'])}")
    rows = [["price", "lookup key", "amount", "usage", "meter", "stripe id"]]
    for key, price in catalog["prices"].items():
        amount = f"{price['unit_amount']} {price['currency']} per {price['interval']}"
        rows.append(
            [
                key,
                price["lookup_key"],
                amount,
                price["usage_type"],
                text(price["meter"]),
                price["id"],
            ]
        )
    print_table(rows)
    credit = catalog.get("welcome_credit")
    if credit:
        print(f"welcome credit: {credit['amount']} {credit['currency']}")
