"""`controlplane capability`: issue a signed capability token for an org."""

from __future__ import annotations

import argparse
import sys

from controlplane.cli.common import Subparsers, core, json_option, print_json, when
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("capability", parents=[common], help="signed capability tokens")
    csub = p.add_subparsers(dest="action", required=True)
    c = json_option(
        csub.add_parser(
            "issue",
            parents=[common],
            help="a token stating the org's plan now; the token alone on stdout",
        )
    )
    c.add_argument("org", help="the org id")
    c.add_argument("--actor", default="cli", help="who, for the audit log (default: cli)")
    p.set_defaults(func=capability)


async def capability(args: argparse.Namespace, config: Config) -> int:
    async with core(config) as cp:
        issued = await cp.issue_capability(args.org, actor=args.actor)
    if args.json:
        print_json(issued)
        return 0
    print(issued.token)  # alone, so that `TOKEN=$(controlplane capability issue ORG)` works
    print(
        f"capability token for {issued.org}: plan {issued.plan}, key {issued.kid}, expires "
        f"{when(issued.expires_at)} (digest {issued.digest})",
        file=sys.stderr,
    )
    return 0
