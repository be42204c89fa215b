"""Changing flags: parse, check the rules, write with the audit record in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import structlog

from controlplane.errors import FlagRefused, InvalidInput, Problem
from controlplane.flags.definitions import FLAGS, Authority, to_json
from controlplane.flags.resolve import FlagValue, Snapshot, resolve
from controlplane.interfaces import (
    AuditEntry,
    FlagGuard,
    FlagWrite,
    SeamReader,
    StaticFlags,
    Storage,
)

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


async def check_seam(seam: SeamReader, current: Snapshot, candidate: Snapshot) -> None:
    """`bill_from` keeps the seam between the two billers (``bill_from.frozen``,
    ``bill_from.excluded``). The provider "has seen" a row that was sent, attempted, or
    cancelled by a rollback (cancelled rows were billed here once, and are the legacy
    biller's now):

    - when T is set, moved, or cut over to, no row the provider has seen may lie at or after
      the new T: while the legacy biller is the authority it bills those buckets (before a
      cutover, or after a rollback), and the control plane would bill them again;
    - while the control plane is the authority, T cannot move once rows at or after the
      earlier of the old and the new T were seen: moving it later hands buckets the provider
      has to the legacy biller too, moving it earlier takes back buckets the legacy biller
      was told to bill (rows of an earlier cutover, rolled back);
    - T cannot move earlier over buckets already excluded as before T: they would be billed
      by neither.
    """
    old, new = current.bill_from, candidate.bill_from
    cutting_over = (
        current.authority is Authority.LEGACY and candidate.authority is Authority.CONTROLPLANE
    )
    live = current.authority is Authority.CONTROLPLANE and old is not None
    if (new is not None or live) and (new != old or cutting_over):
        # while live, clearing T is a move too: from the old T on (else a cleared T could
        # be set again anywhere)
        low = min(x for x in (old, new) if x is not None) if live else new
        if low is not None and (await seam(low)).reached:
            if live:
                detail = (
                    f"rows at or after {low} were already sent, attempted or cancelled; moving "
                    f"bill_from from {old} to {new} would bill buckets twice. Roll back first "
                    "(a new T must then lie after those rows), or force with a reason"
                )
            else:
                detail = (
                    f"rows at or after bill_from {new} were already sent, attempted or "
                    "cancelled (before a rollback), and the legacy biller bills those buckets "
                    "now; choose a T after them, or force with a reason"
                )
            raise FlagRefused("bill_from.frozen", detail)
    if new is not None and (old is None or new < old):  # a cleared T set again counts too
        excluded = (await seam(new)).excluded_before_bill_from
        if excluded:
            raise FlagRefused(
                "bill_from.excluded",
                f"{excluded} rows from {new} on were already excluded as before an earlier "
                "bill_from; moving it earlier would leave them billed by neither side",
            )


async def check_authority(
    seam: SeamReader, current: Snapshot, candidate: Snapshot, via: str | None
) -> None:
    """``authority.legacy_via_rollback``: handing authority back to the legacy biller while
    rows were sent (or attempted) goes through `controlplane cutover rollback`, which decides
    what happens to them (cancel at the provider, or list them for credit notes)."""
    if (
        current.authority is Authority.CONTROLPLANE
        and candidate.authority is Authority.LEGACY
        and via != "rollback"
    ):
        sent = (await seam(current.bill_from or 0)).reached
        if sent:
            raise FlagRefused(
                "authority.legacy_via_rollback",
                f"{sent} rows were already sent or attempted by the control plane; return "
                "authority to legacy with `controlplane cutover rollback` (optionally "
                "--cancel-sent), or force with a reason",
            )


def guard(
    current: Snapshot,
    candidate: Snapshot,
    *,
    bucket_seconds: int,
    at: int,
    max_age_seconds: int | None,
    via: str | None = None,
) -> FlagGuard:
    """Every rule a change from `current` to `candidate` must keep, from any layer (runtime,
    environment, config file). The static rules are checked now; the returned guard checks
    the seam rules and is run by storage inside the transaction that writes the change, so
    no send pass can record an attempt between the check and the write."""
    check(candidate, bucket_seconds)
    check_window(current, candidate, at, max_age_seconds)

    async def in_transaction(seam: SeamReader) -> None:
        await check_seam(seam, current, candidate)
        await check_authority(seam, current, candidate, via)

    return in_transaction


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
    seam_guard = (
        None
        if force
        else guard(
            current,
            candidate,
            bucket_seconds=bucket_seconds,
            at=at,
            max_age_seconds=max_age_seconds,
            via=via,
        )
    )
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
    stored = await storage.write_flags(
        writes, audit, at, guard=seam_guard, flag_versions=versions_of(current)
    )
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


def versions_of(snapshot: Snapshot) -> dict[str, int]:
    """Each flag's runtime version in `snapshot` (0: no runtime value): storage compares them
    in the transaction that writes a flag change, or records a send attempt."""
    return {name: value.version for name, value in snapshot.values.items()}


LAYER_NAMES = {"default": "built-in default", "config": "config file", "env": "environment"}


async def record_static(
    storage: Storage,
    static: Mapping[str, FlagValue],
    *,
    bucket_seconds: int,
    at: int,
    max_age_seconds: int | None,
) -> list[str]:
    """Hold a change of the config file or environment layers to the rules a runtime change
    keeps, and audit it. Called at every start.

    The layers' values are recorded in storage; when they differ from the last record, the
    change they make to the flags in force (runtime values still win) is checked like a
    runtime change and written, with one audit record per flag that moved, in one
    transaction. A refused change raises FlagRefused: the control plane does not start with
    it. The first record (a new store, or one from before static changes were recorded) is
    the baseline: audited, not checked. Returns the flags whose value in force changed.

    Replicas starting together record once: the others find it done when they try again."""
    for attempt in range(3):
        try:
            return await _record_static(
                storage,
                static,
                bucket_seconds=bucket_seconds,
                at=at,
                max_age_seconds=max_age_seconds,
            )
        except FlagRefused as exc:
            if exc.rule != "version" or attempt == 2:
                raise
    return []  # never here: the last attempt returns or raises


async def _record_static(
    storage: Storage,
    static: Mapping[str, FlagValue],
    *,
    bucket_seconds: int,
    at: int,
    max_age_seconds: int | None,
) -> list[str]:
    values = {name: to_json(v.value) for name, v in static.items()}
    before = await storage.static_flags()
    if before == values:
        return []
    runtime = await storage.runtime_flags()
    candidate = resolve(static, runtime)
    if before is None:
        current = candidate
        moved = [name for name, v in static.items() if v.source != "default"]
    else:
        previous = {
            name: FlagValue(value=FLAGS[name].parse(before[name]), source=v.source, version=0)
            if name in before
            else v
            for name, v in static.items()
        }
        current = resolve(previous, runtime)
        moved = [n for n in FLAGS if current.values[n].value != candidate.values[n].value]
    seam_guard = (
        guard(
            current,
            candidate,
            bucket_seconds=bucket_seconds,
            at=at,
            max_age_seconds=max_age_seconds,
        )
        if before is not None and moved
        else None
    )
    group = uuid.uuid4().hex if len(moved) > 1 else None
    audit = [
        AuditEntry(
            action="flag.set",
            subject=name,
            actor=LAYER_NAMES.get(static[name].source, static[name].source),
            reason=(
                "the static layers' values, first recorded"
                if before is None
                else f"changed in the {LAYER_NAMES.get(static[name].source)} before this start"
            ),
            before=None if before is None else to_json(current.values[name].value),
            after=to_json(candidate.values[name].value),
            group_id=group,
        )
        for name in moved
    ]
    await storage.write_flags(
        [],
        audit,
        at,
        guard=seam_guard,
        flag_versions=versions_of(candidate),
        static=StaticFlags(before=before, after=values),
    )
    for entry in audit:
        log.info(
            "flags.changed",
            flag=entry.subject,
            before=entry.before,
            after=entry.after,
            actor=entry.actor,
            forced=False,
        )
    return moved if before is not None else []
