"""`controlplane token`: create an API token (no config needed)."""

from __future__ import annotations

import argparse

from controlplane.cli.common import Subparsers
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("token", parents=[common], help="API tokens")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("create", parents=[common])
    t.add_argument("--name", required=True)
    t.add_argument("--scopes", default="ingest,read")
    p.set_defaults(func=token, sync=True, no_config=True)


def token(args: argparse.Namespace, config: Config | None) -> int:
    from controlplane.auth import create_token

    secret, lines = create_token(
        args.name, [s.strip() for s in args.scopes.split(",") if s.strip()]
    )
    print(f"token (shown once, store it now): {secret}\n")
    print("add to your config:\n")
    print(lines)
    return 0
