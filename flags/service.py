"""Changing flags: parse, check the rules, write with the audit record in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import structlog

from controlplane.errors import FlagRefused, InvalidInput, Problem
from controlplane.interfaces import AuditEntry, FlagWrite, Storage
from flags.definitions import FLAGS, Authority, to_json
from flags.resolve import FlagValue, Snapshot, resolve

log = structlog.get_logger("flags")


class FlagChange(msgspec.Struct, frozen=True):
    name: str
    value: Any


DEFAULT_MAX_EVENT_AGE_SECONDS = 35 * 86400
"""The provider's window when the billing plugin names none: Stripe refuses older events."""


def check(candidate: Snapshot, bucket_seconds: int) -> None:
    """The rules every flag state must keep, static config included. Raises FlagRefused
    naming the rule:

    - ``bill_from.aligned``: T is a bucket boundary;
    - ``shadow.off_requires``: shadow off needs bill_from set and authority controlplane
      (otherwise both billers run, or nobody knows where the seam is).
    """
    bill_from = candidate.bill_from
    if bill_from is not None and bill_from % bucket_seconds:
        raise FlagRefused(
            "bill_from.aligned",
            f"bill_from {bill_from} is not a multiple of the bucket size ({bucket_seconds} s); "
            f"nearest boundaries: {bill_from - bill_from % bucket_seconds} and "
            f"{bill_from - bill_from % bucket_seconds + bucket_seconds}",
        )
    if not candidate.shadow:
        missing = []
        if bill_from is None:
            missing.append("bill_from is not set")
        if candidate.authority is not Authority.CONTROLPLANE:
            missing.append(f"authority is {candidate.authority.value}")
        if missing:
            raise FlagRefused(
                "shadow.off_requires",
                "shadow = false requires bill_from set and authority = controlplane, but "
                + " and ".join(missing)
                + "; set them in the same change (or run `controlplane cutover execute`)",
            )


def check_window(
    current: Snapshot, candidate: Snapshot, now: int, max_age_seconds: int | None
) -> None:
    """A new bill_from must not be older than the provider accepts (``bill_from.window``):
    buckets before its window could never be sent."""
    new = candidate.bill_from
    if new is None or new == current.bill_from:
        return
    max_age = DEFAULT_MAX_EVENT_AGE_SECONDS if max_age_seconds is None else max_age_seconds
    if new < now - max_age:
        raise FlagRefused(
            "bill_from.window",
            f"bill_from {new} is {(now - new) // 86400} days before now; the billing provider "
            f"accepts events at most {max_age // 86400} days ({max_age} s) old, so the buckets "
            f"from {new} to {now - max_age} could never be sent",
        )


async def check_seam(storage: Storage, current: Snapshot, candidate: Snapshot) -> None:
    """`bill_from` keeps the seam between the two billers (``bill_from.frozen``,
    ``bill_from.excluded``):

    - while the control plane is the authority, T cannot move once rows at or after it were
      sent or attempted: buckets between the old and the new T would be billed by both;
    - while the legacy biller is (before a cutover, or after a rollback), a T being set, or
      cut over to, must lie after every row the provider has seen (sent, attempted, or
      cancelled by the rollback): the legacy biller bills those buckets now, and the control
      plane would never bill them again;
    - T cannot move earlier over buckets already excluded as before T: they would be billed
      by neither.
    """
    old, new = current.bill_from, candidate.bill_from
    if current.authority is Authority.LEGACY:
        cutting_over = candidate.authority is Authority.CONTROLPLANE
        if new is not None and (new != old or cutting_over) and (await storage.seam(new)).reached:
            raise FlagRefused(
                "bill_from.frozen",
                f"rows at or after bill_from {new} were already sent, attempted or cancelled "
                "(before a rollback), and the legacy biller bills those buckets now; choose a "
                "T after them, or force with a reason",
            )
    elif old is not None and old != new and (await storage.seam(old)).reached:
        raise FlagRefused(
            "bill_from.frozen",
            f"rows at or after bill_from {old} were already sent or attempted; moving it "
            "would bill buckets twice. Roll back first (a new T must then lie after those "
            "rows), or force with a reason",
        )
    if old is not None and new is not None and new < old:
        excluded = (await storage.seam(new)).excluded_before_bill_from
        if excluded:
            raise FlagRefused(
                "bill_from.excluded",
                f"{excluded} rows from {new} on were already excluded as before bill_from "
                f"{old}; moving it earlier would leave them billed by neither side",
            )


async def check_authority(
    storage: Storage, current: Snapshot, candidate: Snapshot, via: str | None
) -> None:
    """``authority.legacy_via_rollback``: handing authority back to the legacy biller while
    rows were sent (or attempted) goes through `controlplane cutover rollback`, which decides
    what happens to them (cancel at the provider, or list them for credit notes)."""
    if (
        current.authority is Authority.CONTROLPLANE
        and candidate.authority is Authority.LEGACY
        and via != "rollback"
    ):
        sent = (await storage.seam(current.bill_from or 0)).reached
        if sent:
            raise FlagRefused(
                "authority.legacy_via_rollback",
                f"{sent} rows were already sent or attempted by the control plane; return "
                "authority to legacy with `controlplane cutover rollback` (optionally "
                "--cancel-sent), or force with a reason",
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
    max_age_seconds: int | None = None,
    via: str | None = None,
    group_id: str | None = None,
    extra_audit: Sequence[AuditEntry] = (),
) -> Snapshot:
    """Apply `changes` together: all are written with their audit rows, or none is.

    The rules are checked on the candidate state after every change of the call. `via` names
    the internal path making the change (``"execute"``, ``"rollback"``: the cutover), recorded
    in the audit; `extra_audit` entries are written in the same transaction, under the same
    group id (`group_id`, or a new one when several rows are written)."""
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
        check_window(current, candidate, at, max_age_seconds)
        await check_seam(storage, current, candidate)
        await check_authority(storage, current, candidate, via)
    group = group_id or (uuid.uuid4().hex if len(parsed) + len(extra_audit) > 1 else None)
    if via:
        reason = f"{reason} [via {via}]"
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
    audit += [msgspec.structs.replace(e, group_id=group) for e in extra_audit]
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
