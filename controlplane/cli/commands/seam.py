"""`controlplane seam`: which buckets the legacy biller may bill, per org (read-only)."""

from __future__ import annotations

import argparse

from controlplane.cli.common import (
    Subparsers,
    core,
    flag_text,
    json_option,
    print_fields,
    print_json,
    print_table,
    unix_time,
    when,
)
from controlplane.config import Config
from controlplane.seam import Seam

RULE = (
    "the legacy biller bills a bucket only if it starts before legacy_bill_until (every bucket "
    "when it is null) and lies in none of its org's ranges"
)


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = json_option(
        sub.add_parser(
            "seam",
            parents=[common],
            help="legacy_bill_until and, per org, the bucket ranges the control plane bills",
            epilog=RULE,
        )
    )
    at = "unix seconds or RFC 3339, on a bucket boundary"
    p.add_argument("--from", dest="start", type=unix_time, required=True, help=at)
    p.add_argument("--to", dest="end", type=unix_time, required=True, help=f"{at} (exclusive)")
    p.add_argument("--org", help="one org only")
    p.set_defaults(func=seam)


async def seam(args: argparse.Namespace, config: Config) -> int:
    async with core(config, readonly=True) as cp:
        answer = await cp.cutover.seam(args.start, args.end, args.org)
    if args.json:
        print_json(answer)
    else:
        show(answer)
    return 0


def show(answer: Seam) -> None:
    print_fields(
        [
            ("window", f"[{when(answer.start)}, {when(answer.end)})"),
            ("authority", answer.authority),
            ("legacy_bill_until", flag_text("legacy_bill_until", answer.legacy_bill_until)),
        ]
    )
    print()
    if answer.orgs:
        rows = [["org", "from", "to", "buckets"]]
        for org in answer.orgs:
            for r in org.ranges:
                buckets = (r.end - r.start) // answer.bucket_seconds
                rows.append([org.org_id, when(r.start), when(r.end), str(buckets)])
        print_table(rows)
    else:
        print("the control plane bills no bucket in this window")
    print()
    print(RULE + ".")
