"""`controlplane flags`: list, set and audit the cutover flags."""

from __future__ import annotations

import argparse

from controlplane.cli.common import (
    Subparsers,
    core,
    flag_text,
    json_option,
    print_json,
    print_table,
    when,
)
from controlplane.config import Config
from controlplane.flags import FLAGS, Snapshot

VALUES = {
    "shadow": "true or false",
    "bill_from": "T as unix seconds or RFC 3339 (2026-01-01T00:00:00Z), aligned to a bucket; "
    "'null' clears it",
    "authority": "legacy or controlplane",
}


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("flags", parents=[common], help="cutover flags")
    fsub = p.add_subparsers(dest="action", required=True)
    json_option(fsub.add_parser("list", parents=[common], help="each flag, its source, version"))
    f = json_option(
        fsub.add_parser(
            "set",
            parents=[common],
            help="set one flag at runtime (audited; refused when a rule is broken)",
            epilog="values: " + "; ".join(f"{name}: {v}" for name, v in VALUES.items()),
        )
    )
    f.add_argument("name", choices=list(FLAGS), help="the flag")
    f.add_argument("value", help="its new value (see below)")
    f.add_argument("--reason", required=True, help="why, for the audit log")
    f.add_argument("--force", action="store_true", help="override a refusing rule (audited)")
    f.add_argument("--actor", default="cli", help="who, for the audit log (default: cli)")
    f = json_option(fsub.add_parser("audit", parents=[common], help="recent flag changes"))
    f.add_argument("--limit", type=int, default=50, help="newest N changes (default 50)")
    p.set_defaults(func=flags)


async def flags(args: argparse.Namespace, config: Config) -> int:
    from controlplane.flags import FlagChange

    async with core(config, readonly=args.action != "set") as cp:
        if args.action == "set":
            snapshot = await cp.set_flags(
                [FlagChange(name=args.name, value=args.value)],
                actor=args.actor,
                reason=args.reason,
                force=args.force,
            )
        elif args.action == "audit":
            records = await cp.audit_entries("flag.", limit=args.limit)
            if args.json:
                print_json(records)
                return 0
            rows = [["at", "flag", "before", "after", "by", "forced", "reason"]]
            for r in records:
                flag = r.subject
                rows.append(
                    [
                        when(r.at),
                        flag,
                        flag_text(flag, r.before),
                        flag_text(flag, r.after),
                        r.actor,
                        "yes" if r.forced else "no",
                        r.reason or "-",
                    ]
                )
            print_table(rows) if records else print("no flag changes recorded")
            return 0
        else:
            snapshot = await cp.flags()
    show(snapshot, as_json=args.json)
    return 0


def show(snapshot: Snapshot, *, as_json: bool) -> None:
    if as_json:
        print_json(snapshot.to_api())
        return
    rows = [["flag", "value", "source", "version"]]
    for name, v in snapshot.values.items():
        rows.append([name, flag_text(name, v.value), v.source, str(v.version)])
    rows.append(["legacy_bill_until", flag_text("bill_from", snapshot.legacy_bill_until), "", ""])
    print_table(rows)
