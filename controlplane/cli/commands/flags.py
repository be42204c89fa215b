"""`controlplane flags`: list, set and audit the cutover flags."""

from __future__ import annotations

import argparse
import json

from controlplane.cli.common import Subparsers, core, print_json
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("flags", parents=[common], help="cutover flags")
    fsub = p.add_subparsers(dest="action", required=True)
    fsub.add_parser("list", parents=[common])
    f = fsub.add_parser("set", parents=[common])
    f.add_argument("name")
    f.add_argument("value")
    f.add_argument("--reason", required=True)
    f.add_argument("--force", action="store_true")
    f.add_argument("--actor", default="cli")
    f = fsub.add_parser("audit", parents=[common])
    f.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=flags)


async def flags(args: argparse.Namespace, config: Config) -> int:
    from controlplane.flags import FlagChange

    async with core(config) as cp:
        if args.action == "set":
            snapshot = await cp.set_flags(
                [FlagChange(name=args.name, value=args.value)],
                actor=args.actor,
                reason=args.reason,
                force=args.force,
            )
            print_json(snapshot.to_api())
        elif args.action == "audit":
            records = await cp.audit_entries("flag.", limit=args.limit)
            for r in records:
                forced = " (forced)" if r.forced else ""
                print(
                    f"{r.at}  {r.subject}: {r.before!r} -> {r.after!r}  by {r.actor}{forced}: "
                    f"{r.reason}"
                )
        else:
            snapshot = await cp.flags()
            for name, v in snapshot.values.items():
                value = v.value.value if hasattr(v.value, "value") else v.value
                print(f"{name:<10} {json.dumps(value):<14} source={v.source} version={v.version}")
            print(f"legacy_bill_until {json.dumps(snapshot.legacy_bill_until)}")
    return 0
