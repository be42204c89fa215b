"""`controlplane rollup` and `controlplane send`: one recorded pass of a scheduled job."""

from __future__ import annotations

import argparse

from controlplane.cli.common import Subparsers, core, print_json
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("rollup", parents=[common], help="roll up closed buckets into the ledger")
    p.add_argument("--until", type=int, help="treat buckets ending at or before T as closed")
    p.set_defaults(func=rollup)

    p = sub.add_parser(
        "send", parents=[common], help="deliver pending ledger rows (when flags allow)"
    )
    p.set_defaults(func=send)


async def rollup(args: argparse.Namespace, config: Config) -> int:
    async with core(config) as cp:
        stats = await cp.record("rollup", lambda: cp.rollup(until=args.until))
    print_json(stats)
    return 0


async def send(args: argparse.Namespace, config: Config) -> int:
    async with core(config) as cp:
        stats = await cp.record("send", cp.send)
    print_json(stats)
    return 0
