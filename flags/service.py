"""Changing flags: parse, check the rules, write with the audit record in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import structlog

from controlplane.errors import FlagRefused, InvalidInput, Problem
from controlplane.interfaces import AuditEntry, FlagWrite, Storage
from flags.definitions import FLAGS, to_json
from flags.resolve import FlagValue, Snapshot, resolve

log = structlog.get_logger("flags")


class FlagChange(msgspec.Struct, frozen=True):
    name: str
    value: Any


def check(candidate: Snapshot, bucket_seconds: int) -> None:
    """The rules every flag state must keep. Raises FlagRefused naming the rule."""
    bill_from = candidate.bill_from
    if bill_from is not None and bill_from % bucket_seconds:
        raise FlagRefused(
            "bill_from.aligned",
            f"bill_from {bill_from} is not a multiple of the bucket size ({bucket_seconds} s); "
            f"nearest boundaries: {bill_from - bill_from % bucket_seconds} and "
            f"{bill_from - bill_from % bucket_seconds + bucket_seconds}",
        )


async def check_seam(storage: Storage, current: Snapshot, candidate: Snapshot) -> None:
    """`bill_from` keeps the seam between the two billers:

    - it cannot move once rows at or after it were sent or attempted: buckets between the old
      and the new T would be billed by both;
    - it cannot move earlier over buckets already excluded as before T: they would be billed
      by neither.
    """
    old, new = current.bill_from, candidate.bill_from
    if old is None or old == new:
        return
    if (await storage.seam(old)).reached:
        raise FlagRefused(
            "bill_from.frozen",
            f"rows at or after bill_from {old} were already sent or attempted; moving it "
            "would bill buckets twice. Roll back first, or force with a reason",
        )
    if new is not None and new < old:
        excluded = (await storage.seam(new)).excluded_before_bill_from
        if excluded:
            raise FlagRefused(
                "bill_from.excluded",
                f"{excluded} rows from {new} on were already excluded as before bill_from "
                f"{old}; moving it earlier would leave them billed by neither side",
            )


async def set_flags(
    storage: Storage,
    static: Mapping[str, FlagValue],
    changes: Sequence[FlagChange],
    *,
    actor: str,
    reason: str,
    bucket_seconds: int,
    at: int,
    force: bool = False,
) -> Snapshot:
    """Apply `changes` together: all are written with their audit rows, or none is."""
    if not reason or not reason.strip():
        raise InvalidInput([Problem(field="reason", message="required: say why the flag changes")])
    parsed: dict[str, Any] = {}
    for change in changes:
        spec = FLAGS.get(change.name)
        if spec is None:
            raise InvalidInput(
                [
                    Problem(
                        field="name",
                        message=f"unknown flag {change.name!r}; known: {sorted(FLAGS)}",
                    )
                ]
            )
        try:
            parsed[change.name] = spec.parse(change.value)
        except ValueError as exc:
            raise InvalidInput([Problem(field="value", message=f"{change.name}: {exc}")]) from exc
    runtime = await storage.runtime_flags()
    current = resolve(static, runtime)
    candidate = Snapshot(
        values={
            **current.values,
            **{
                name: FlagValue(
                    value=value, source="runtime", version=current.values[name].version + 1
                )
                for name, value in parsed.items()
            },
        }
    )
    if not force:
        check(candidate, bucket_seconds)
        await check_seam(storage, current, candidate)
    group = uuid.uuid4().hex if len(parsed) > 1 else None
    writes = [
        FlagWrite(
            name=name,
            value=to_json(value),
            expected_version=runtime[name].version if name in runtime else 0,
        )
        for name, value in parsed.items()
    ]
    audit = [
        AuditEntry(
            action="flag.set",
            subject=name,
            actor=actor,
            reason=reason,
            before=to_json(current.values[name].value),
            after=to_json(value),
            forced=force,
            group_id=group,
        )
        for name, value in parsed.items()
    ]
    stored = await storage.write_flags(writes, audit, at)
    for name, value in parsed.items():
        log.info(
            "flags.changed",
            flag=name,
            before=to_json(current.values[name].value),
            after=to_json(value),
            actor=actor,
            forced=force,
        )
    return resolve(static, {**runtime, **stored})
