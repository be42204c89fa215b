"""`controlplane demo`: a guided first run against the Stripe emulator."""

from __future__ import annotations

import argparse

from controlplane.cli.common import Subparsers, core
from controlplane.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common], help="a guided first run against the Stripe emulator"
    )
    p.add_argument("--hours", type=int, default=3, help="hours of sample usage (default 3)")
    p.add_argument("--cutover", action="store_true", help="flip the flags and send")
    p.set_defaults(func=demo)


async def demo(args: argparse.Namespace, config: Config) -> int:
    from controlplane import demo as demo_mod

    async with core(config) as cp:
        await demo_mod.run(cp, hours=args.hours, cutover=args.cutover)
    return 0
