"""`controlplane migrate`: apply pending schema migrations, with storage alone."""

from __future__ import annotations

import argparse

from controlplane.cli.common import Subparsers
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    p.set_defaults(func=migrate)


async def migrate(args: argparse.Namespace, config: Config) -> int:
    from controlplane.core import ControlPlane

    applied, status = await ControlPlane.migrate_storage(config)
    print(f"database {config.storage_where}: schema at {status.applied[-1]}")
    print(f"applied now: {', '.join(applied) or 'nothing (it was current)'}")
    return 0
