"""`controlplane rollup` and `controlplane send`: one recorded pass of a scheduled job."""

from __future__ import annotations

import argparse

from controlplane.cli.common import (
    Subparsers,
    core,
    json_option,
    print_counts,
    unix_time,
)
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = json_option(
        sub.add_parser("rollup", parents=[common], help="roll up closed buckets into the ledger")
    )
    p.add_argument(
        "--until",
        type=unix_time,
        help="treat buckets ending at or before this time as closed (unix seconds or RFC 3339)",
    )
    p.set_defaults(func=rollup)

    p = json_option(
        sub.add_parser(
            "send", parents=[common], help="deliver pending ledger rows (when flags allow)"
        )
    )
    p.set_defaults(func=send)


async def rollup(args: argparse.Namespace, config: Config) -> int:
    async with core(config) as cp:
        stats = await cp.record("rollup", lambda: cp.rollup(until=args.until))
    print_counts(stats, as_json=args.json)
    return 0


async def send(args: argparse.Namespace, config: Config) -> int:
    async with core(config) as cp:
        stats = await cp.record("send", cp.send)
    print_counts(stats, as_json=args.json)
    return 0
