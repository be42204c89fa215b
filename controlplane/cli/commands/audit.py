"""`controlplane audit`: verify the tamper-evident audit chain; make a signing key pair."""

from __future__ import annotations

import argparse
import sys

from controlplane.cli.common import Subparsers, core, json_option, print_json
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("audit", parents=[common], help="the tamper-evident audit chain")
    asub = p.add_subparsers(dest="action", required=True)
    v = json_option(
        asub.add_parser(
            "verify", parents=[common], help="walk the chain; exit 1 at the first broken link"
        )
    )
    v.add_argument(
        "--signed-from",
        type=int,
        metavar="ID",
        help="records before this id may be unsigned (default: [audit] signed_from)",
    )
    asub.add_parser("keygen", parents=[common], help="print a new Ed25519 key pair for [audit]")
    p.set_defaults(func=audit_cmd)


async def audit_cmd(args: argparse.Namespace, config: Config) -> int:
    if args.action == "keygen":
        from controlplane.audit import new_ed25519_key

        private, public = new_ed25519_key()
        print("# [audit] for the control plane (keep `key` secret, e.g. in an env variable):")
        print('algorithm = "ed25519"')
        print(f'key = "{private}"')
        print(f'public_key = "{public}"  # auditors need only this one')
        return 0
    signed_from = args.signed_from or config.audit.signed_from
    async with core(config, readonly=True) as cp:
        signed = ""
        if cp.audit_keys:
            signed = f" (signed from record {signed_from})" if signed_from else " (all signed)"

        def progress(done: int) -> None:
            print(f"  {done:,} records verified", file=sys.stderr)

        checked, broken = await cp.verify_audit(
            progress if sys.stderr.isatty() else None, signed_from=signed_from
        )
    if args.json:
        print_json({"records": checked, "intact": broken is None, "broken": broken})
        return 0 if broken is None else 1
    if broken is None:
        print(f"audit chain intact: {checked:,} records{signed}")
        return 0
    print(f"audit chain BROKEN at record {broken.id}: {broken.reason}")
    print(f"  ({checked:,} records before it hold)")
    return 1
