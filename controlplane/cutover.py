"""Cutover: a small state machine over the flags (DESIGN §6), the steps of :class:`Cutover`.

- :meth:`~Cutover.plan` explains, for a boundary T, who bills which buckets now and after,
  and what would change; it changes nothing.
- :meth:`~Cutover.preflight` runs every precondition and reports each as pass, fail, warn
  (cannot tell) or not applicable.
- :meth:`~Cutover.execute` re-runs preflight, then sets ``authority = controlplane``,
  ``bill_from = T`` and ``shadow = false`` in one transaction, with one audit group that also
  holds the ``cutover.execute`` record.
- :meth:`~Cutover.rollback` sets ``authority = legacy`` and ``shadow = true`` (one
  transaction, audited ``cutover.rollback``) and, with ``cancel_sent``, hands back what the
  provider may hold (:mod:`controlplane.handback`): cancelled inside ``[cutover]
  cancel_window_seconds``, offset in its open billing period past it, else listed for a credit
  note.
- :meth:`~Cutover.status` derives the stage (``shadow``, ``armed``, ``live``,
  ``rolled_back``) from the flags and the audit history.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol

import msgspec
import structlog

from controlplane.config import Config
from controlplane.errors import (
    BillingError,
    ConfigError,
    ControlPlaneError,
    FlagRefused,
    HandBackBusy,
    InvalidInput,
    Problem,
)
from controlplane.flags import Authority, FlagChange, Snapshot
from controlplane.flags.definitions import to_json
from controlplane.flags.resolve import FlagValue
from controlplane.flags.service import check, check_seam, check_window
from controlplane.interfaces import (
    AuditEntry,
    AuditRecord,
    Billing,
    CapabilityUnavailable,
    Claim,
    LegacyError,
    LegacySource,
    MeterSummaries,
    Storage,
)
from controlplane.ledger import LedgerRow, RowState
from controlplane.meters import MeterSet
from controlplane.parity import CleanSince
from controlplane.parity_checker import settled_end
from controlplane.plans import Plans
from controlplane.reconcile import clean_since
from controlplane.reversal import CreditNote, HandedBack, RowNote
from controlplane.rollup import DEFAULT_SOURCE
from controlplane.seam import Seam, seam_of, window_problems
from controlplane.times import iso

HAND_BACK_HOLD_SECONDS = 300  # renewed while the hand-back runs; lapses soon after a crash

log = structlog.get_logger("cutover")


class SetFlags(Protocol):
    """The core's guarded, audited flag write (:meth:`ControlPlane.set_flags`)."""

    async def __call__(
        self,
        changes: Sequence[FlagChange],
        *,
        actor: str,
        reason: str,
        force: bool = ...,
        via: str | None = ...,
        group_id: str | None = ...,
        extra_audit: Sequence[AuditEntry] = ...,
    ) -> Snapshot: ...


Status = Literal["pass", "fail", "warn", "n/a"]
Stage = Literal["shadow", "armed", "live", "rolled_back"]


class Check(msgspec.Struct, frozen=True):
    """One precondition: `status` is pass, fail, warn (passes, but could not be verified)
    or n/a (does not apply to this configuration)."""

    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "fail"


class Preflight(msgspec.Struct, frozen=True):
    at: int
    checked_at: int
    ok: bool
    checks: list[Check]


class FlagDiff(msgspec.Struct, frozen=True):
    flag: str
    before: Any
    after: Any


class Plan(msgspec.Struct, frozen=True):
    at: int
    now: int
    before: list[str]  # who bills what now
    after: list[str]  # who bills what after execute
    changes: list[FlagDiff]
    pending_from_t: int  # pending rows at or after T: sent once execute has run
    pending_before_t: int  # pending rows before T: excluded (the legacy biller bills them)
    problems: list[dict[str, str]]  # guard refusals execute would meet now


class RollbackResult(msgspec.Struct, frozen=True):
    flags: dict[str, Any]
    cancelled: list[RowNote]  # cancelled at the provider: the legacy biller bills them
    not_cancelled: list[RowNote]  # still at the provider: a credit note, or reconciliation
    offset: list[RowNote] = []  # offset in their open billing period: the legacy biller bills them
    credit_notes: list[CreditNote] = []  # per customer, invoice and meter: issued, or to issue
    credited: list[RowNote] = []  # credited on their invoice: the legacy biller bills them
    senders_still_running: str | None = None  # why the lists may be incomplete


class CutoverStatus(msgspec.Struct, frozen=True):
    stage: Stage
    flags: dict[str, Any]
    history: list[dict[str, Any]]  # cutover.* audit entries, newest first
    reconciled_clean_since: int | None = None  # the unbroken series of clean reconciliations


# ---------------------------------------------------------------------------------------------


def _who(snapshot: Snapshot) -> list[str]:
    """Who bills which buckets under `snapshot`, for every combination of the three flags:
    the legacy biller bills before ``legacy_bill_until`` (everything while it is unset)."""
    t = snapshot.legacy_bill_until
    if t is None:
        legacy = "legacy biller: every bucket"
        if snapshot.authority is Authority.CONTROLPLANE:  # authority without T
            cp = "control plane: sends nothing until bill_from (T) is set"
        elif snapshot.shadow:
            cp = "control plane: computes in shadow, sends nothing"
        else:
            cp = "control plane: sends nothing (authority is legacy)"
        return [legacy, cp]
    when = f"{iso(t)} ({t})"
    legacy = f"legacy biller: buckets starting before {when}"
    if snapshot.shadow:  # a paused cutover: nobody bills from T on yet, nothing is lost
        cp = (
            f"control plane: buckets starting at or after {when}, computed in shadow and "
            "sent once shadow is off (paused: not billed yet)"
        )
    else:
        cp = f"control plane: buckets starting at or after {when} (sending)"
    return [legacy, cp]


def _candidate(current: Snapshot, values: dict[str, Any]) -> Snapshot:
    return Snapshot(
        values={
            **current.values,
            **{
                name: FlagValue(value=v, source="runtime", version=current.values[name].version)
                for name, v in values.items()
            },
        }
    )


def _live_values(at: int) -> dict[str, Any]:
    return {"authority": Authority.CONTROLPLANE, "bill_from": at, "shadow": False}


def _at(current: Snapshot, at: int | None) -> int:
    if at is not None:
        return at
    if current.bill_from is None:
        raise InvalidInput([Problem(field="at", message="required: bill_from is not set")])
    return current.bill_from


# preflight ------------------------------------------------------------------------------------


# execute and rollback -------------------------------------------------------------------------


# status ---------------------------------------------------------------------------------------


def stage_of(snapshot: Snapshot, history: list[AuditRecord]) -> Stage:
    """live: the control plane bills (authority controlplane, shadow off); rolled_back: the
    latest cutover step was a rollback; armed: bill_from is set but not live; shadow: else."""
    if snapshot.authority is Authority.CONTROLPLANE and not snapshot.shadow:
        return "live"
    if history and history[0].action == "cutover.rollback":
        return "rolled_back"
    if snapshot.bill_from is not None:
        return "armed"
    return "shadow"


@dataclasses.dataclass(frozen=True)
class Cutover:
    """What the cutover steps need: `config` (its rollup, parity, catalog and cutover
    sections), the stores, the legacy source and billing plugin when configured, the meters,
    a clock, and the core's flag reads and writes (so that every flag change goes through the
    same guarded, audited path) and its parity history."""

    config: Config
    storage: Storage
    legacy: LegacySource | None
    billing: Billing | None
    meters: MeterSet
    plans: Plans
    now: Callable[[], int]
    max_event_age_seconds: Callable[[], int]
    flags: Callable[[], Awaitable[Snapshot]]
    set_flags: SetFlags
    parity_clean_since: Callable[[], Awaitable[CleanSince]]
    # checks the last closed month's invoices now: (clean?, detail); see money_parity
    money_parity_clean: Callable[[], Awaitable[tuple[bool, str]]] | None = None
    # hands back what the provider may hold after a rollback (controlplane.handback)
    hand_back: Callable[[str, bool], Awaitable[HandedBack]] | None = None

    async def _guard_problems(self, current: Snapshot, at: int) -> list[dict[str, str]]:
        candidate = _candidate(current, _live_values(at))
        problems: list[dict[str, str]] = []
        try:
            check(candidate, self.config.rollup.bucket_seconds)
            check_window(current, candidate, self.now(), self.max_event_age_seconds())
            await check_seam(self.storage.seam, current, candidate)
        except FlagRefused as exc:
            problems.append({"rule": exc.rule, "message": exc.message})
        return problems

    async def plan(self, at: int) -> Plan:
        """What `execute` at T would do, from the current state. Changes nothing."""
        current = await self.flags()
        after = _candidate(current, _live_values(at))
        changes = [
            FlagDiff(name, to_json(current.values[name].value), to_json(value))
            for name, value in _live_values(at).items()
            if current.values[name].value != value
        ]
        pending_from_t = pending_before_t = 0
        async for row in self._rows(RowState.PENDING):
            if row.bucket_start >= at:
                pending_from_t += 1
            else:
                pending_before_t += 1
        return Plan(
            at=at,
            now=self.now(),
            before=_who(current),
            after=_who(after),
            changes=changes,
            pending_from_t=pending_from_t,
            pending_before_t=pending_before_t,
            problems=await self._guard_problems(current, at),
        )

    async def _check_t(self, current: Snapshot, at: int) -> Check:
        problems = await self._guard_problems(current, at)
        if problems:
            return Check("t_valid", "fail", "; ".join(p["message"] for p in problems))
        return Check(
            "t_valid",
            "pass",
            f"{at} is a bucket boundary ({self.config.rollup.bucket_seconds} s) inside the "
            f"provider's window ({self.max_event_age_seconds()} s)",
        )

    async def _check_customers(self) -> Check:
        name = "billable_orgs_have_customer"
        missing: list[str] = []
        for plan in self.plans.billable:
            missing += await self.storage.orgs_without_customer(plan, self.now())
        if missing:
            shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
            return Check(
                name,
                "fail",
                f"{len(missing)} orgs on a billable plan have no provider customer: {shown}",
            )
        plans = ", ".join(self.plans.billable)
        return Check(name, "pass", f"every org on a billable plan ({plans}) has a customer")

    async def _check_planned(self) -> Check:
        """Usage excluded as free only by default (no plan from any source) over the parity
        window: it may be meant, or an org nobody set a plan for."""
        name = "usage_has_a_plan"
        since = self.now() - self.config.cutover.parity_clean_hours * 3600
        orgs: set[str] = set()
        after = 0
        while rows := await self.storage.ledger(
            state=RowState.EXCLUDED, start=since, after_id=after, limit=5000
        ):
            orgs.update(r.org_id for r in rows if r.plan_source == DEFAULT_SOURCE)
            after = rows[-1].id
        if orgs:
            shown = ", ".join(sorted(orgs)[:20]) + (" ..." if len(orgs) > 20 else "")
            return Check(
                name,
                "warn",
                f"{len(orgs)} orgs' usage since {iso(since)} is free only because no plan came "
                f"from any source (token, stored, legacy): {shown}; set their plans "
                "(`controlplane orgs set`) if any should be billed",
            )
        return Check(name, "pass", f"every org's usage since {iso(since)} has a plan")

    async def _check_parity(self) -> Check:
        hours = self.config.cutover.parity_clean_hours
        if self.legacy is None:
            return Check(
                "parity_clean",
                "fail",
                "parity history unavailable: no [legacy] source is configured, so the checker "
                "never compared the two billers",
            )
        clean = await self.parity_clean_since()
        bucket = self.config.rollup.bucket_seconds
        horizon = settled_end(
            self.now(), self.config.rollup.grace_seconds, self.config.parity.settle_seconds, bucket
        )
        if clean.until is None:
            return Check(
                "parity_clean", "fail", "parity history unavailable: no checked bucket yet"
            )
        if clean.until < horizon:
            return Check(
                "parity_clean",
                "fail",
                f"the checker is behind: the newest checked bucket ends at {clean.until}, settled "
                f"buckets end at {horizon}; run `controlplane parity checker`",
            )
        if clean.since is None or clean.seconds < hours * 3600:
            return Check(
                "parity_clean",
                "fail",
                f"parity clean for {clean.seconds // 3600} h ({clean.buckets} buckets) up to "
                f"{clean.until}; {hours} h required ([cutover] parity_clean_hours)",
            )
        return Check(
            "parity_clean",
            "pass",
            f"parity clean since {clean.since} ({clean.seconds // 3600} h, "
            f"{clean.buckets} buckets) up to {clean.until}; {hours} h required",
        )

    async def _check_legacy(self, at: int) -> Check:
        name = "legacy_not_billed_from_t"
        if self.legacy is None:
            return Check(name, "warn", "cannot tell: no [legacy] source is configured")
        try:
            until = await self.legacy.billed_until()
        except CapabilityUnavailable as exc:
            return Check(name, "warn", f"cannot tell: {exc}")
        except LegacyError as exc:
            return Check(name, "fail", f"the legacy source failed: {exc}")
        if until is None:
            return Check(name, "pass", "the legacy biller has billed nothing yet")
        if until <= at:
            return Check(name, "pass", f"the legacy biller billed up to {until} (<= T {at})")
        return Check(
            name,
            "fail",
            f"the legacy biller already billed up to {until}, past T {at}: pick a later T",
        )

    async def _check_money_parity(self) -> Check:
        name = "money_parity"
        if not self.config.cutover.require_money_parity:
            return Check(name, "n/a", "not required ([cutover] require_money_parity = false)")
        if self.money_parity_clean is None:
            return Check(name, "fail", "required, but money parity is not available here")
        try:
            clean, detail = await self.money_parity_clean()
        except (LegacyError, BillingError, ConfigError, InvalidInput) as exc:
            return Check(name, "fail", f"money parity could not be checked: {exc}")
        return Check(name, "pass" if clean else "fail", detail)

    async def _check_catalog(self) -> Check:
        catalog = self.config.catalog
        if not catalog.prices and not catalog.products:
            return Check("catalog_published", "n/a", "no [catalog] is configured")
        version = await self.storage.catalog_version()
        if version is None:
            return Check(
                "catalog_published",
                "fail",
                "no catalog version: run `controlplane catalog publish`",
            )
        return Check(
            "catalog_published",
            "pass",
            f"catalog version {version.version} published at {version.published_at}",
        )

    async def _check_tokens(self) -> Check:
        """No event of a `[capabilities] required_for` type came without a capability token
        over the parity soak window: once live, such events would be refused."""
        name = "capability_tokens_carried"
        types = self.config.capabilities.required_for
        if not types:
            return Check(name, "n/a", "no [capabilities] required_for types are configured")
        hours = self.config.cutover.parity_clean_hours
        since = self.now() - hours * 3600
        missing = await self.storage.untokened_events(types, since * 1000)
        if missing:
            return Check(
                name,
                "fail",
                f"{missing} events of {', '.join(sorted(types))} in the last {hours} h carried "
                "no capability token: they would be refused once the control plane is the "
                "billing authority",
            )
        return Check(
            name, "pass", f"every event of {', '.join(sorted(types))} in {hours} h had a token"
        )

    async def _check_reconciled(self) -> Check:
        """After a rollback, the provider's books must agree with the ledger before the
        control plane bills again: the newest reconciliation of every org since the rollback,
        from the rolled-back T on, is clean."""
        name = "reconciled_since_rollback"
        rollbacks = await self.storage.audit_log(action_prefix="cutover.rollback", limit=1)
        if not rollbacks:
            return Check(name, "n/a", "no rollback: nothing sent before to reconcile")
        if not isinstance(self.billing, MeterSummaries):
            return Check(name, "warn", "cannot tell: the billing plugin cannot reconcile")
        rollback = rollbacks[0]
        runs = await self.storage.reconcile_runs(limit=200)
        since = [r for r in runs if r.org_id is None and r.checked_at >= rollback.at]
        if not since:
            return Check(
                name,
                "fail",
                "no reconciliation of every org since the rollback: run `controlplane reconcile`",
            )
        newest = since[0]
        t = int(rollback.subject) if rollback.subject.isdigit() else None
        if t is not None and newest.start > t:
            return Check(
                name,
                "fail",
                f"the newest reconciliation starts at {iso(newest.start)}, after the rolled-back "
                f"T {iso(t)}: reconcile from T (`controlplane reconcile --from {t} --to ...`)",
            )
        if not newest.clean:
            return Check(
                name,
                "fail",
                f"the newest reconciliation found {newest.units_short} "
                f"units short and {newest.units_over} over at the provider",
            )
        return Check(name, "pass", f"reconciled clean since {iso(clean_since(runs))}")

    async def preflight(self, at: int | None = None) -> Preflight:
        """Every precondition of a cutover at T (default: the current bill_from)."""
        current = await self.flags()
        t = _at(current, at)
        checks = [
            await self._check_t(current, t),
            await self._check_customers(),
            await self._check_planned(),
            await self._check_parity(),
            await self._check_legacy(t),
            await self._check_catalog(),
            await self._check_tokens(),
            await self._check_reconciled(),
            await self._check_money_parity(),
        ]
        return Preflight(at=t, checked_at=self.now(), ok=all(c.ok for c in checks), checks=checks)

    async def execute(
        self, at: int | None, *, actor: str, reason: str, force: bool = False
    ) -> tuple[Preflight, Snapshot]:
        """Re-run preflight, then flip the three flags in one transaction and one audit group.

        Raises FlagRefused (rule ``cutover.preflight``) when a check fails, unless forced."""
        before = await self.flags()
        report = await self.preflight(at)
        if not report.ok and not force:
            failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]
            raise FlagRefused("cutover.preflight", "preflight failed: " + "; ".join(failed))
        entry = AuditEntry(
            action="cutover.execute",
            subject=str(report.at),
            actor=actor,
            reason=reason,
            before=before.to_api(),
            after={"preflight": msgspec.to_builtins(report.checks), "at": report.at},
            forced=force,
        )
        snapshot = await self.set_flags(
            [FlagChange(name, to_json(v)) for name, v in _live_values(report.at).items()],
            actor=actor,
            reason=reason,
            force=force,
            via="execute",
            group_id=uuid.uuid4().hex,
            extra_audit=[entry],
        )
        log.info("cutover.executed", at=report.at, actor=actor, forced=force)
        return report, snapshot

    async def rollback(
        self,
        *,
        actor: str,
        reason: str,
        cancel_sent: bool = False,
        create_credit_notes: bool = False,
    ) -> RollbackResult:
        """Authority back to legacy and shadow on; with `cancel_sent`, hand back what the
        provider may hold (cancel, offset, or list for a credit note)."""
        before = await self.flags()
        entry = AuditEntry(
            action="cutover.rollback",
            subject=str(before.bill_from),
            actor=actor,
            reason=reason,
            before=before.to_api(),
            after={"cancel_sent": cancel_sent, "create_credit_notes": create_credit_notes},
        )
        hold: Claim | None = None
        if cancel_sent and self.hand_back is not None:
            # While the hand-back works, no sender may send a correction of a bucket billed
            # here (one that stays would then be split): hold them all, before the flags flip.
            now = int(self.now())
            claimant = f"rollback:{uuid.uuid4().hex[:8]}"
            hold = Claim(claimant, now, now + HAND_BACK_HOLD_SECONDS)
            if not await self.storage.hold_billed_buckets(hold):
                raise HandBackBusy()
        try:
            snapshot = await self.set_flags(
                [FlagChange("authority", Authority.LEGACY.value), FlagChange("shadow", True)],
                actor=actor,
                reason=reason,
                via="rollback",
                group_id=uuid.uuid4().hex,
                extra_audit=[entry],
            )
            log.info("cutover.rolled_back", actor=actor, cancel_sent=cancel_sent)
            if hold is None or self.hand_back is None:
                waiting = await self._await_senders()
                return RollbackResult(snapshot.to_api(), [], [], senders_still_running=waiting)
            waiting = await self._await_senders(other_than=hold.claimant)
            # what a pass in flight sent meanwhile is held too, once that pass ended
            await self._hold_again(hold.claimant)
            waiting = await self._await_senders(other_than=hold.claimant) or waiting
            renewing = asyncio.create_task(self._renew(hold.claimant))
            try:
                done = await self.hand_back(actor, create_credit_notes)
            finally:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
        finally:
            if hold is not None:
                await self.storage.release_claims(hold.claimant)
        return RollbackResult(
            snapshot.to_api(),
            done.cancelled,
            done.not_cancelled,
            done.offset,
            done.credit_notes,
            done.credited,
            waiting,
        )

    async def _rows(
        self, state: RowState, attempted: bool | None = None, page: int = 5000
    ) -> AsyncIterator[LedgerRow]:
        """Every ledger row in `state` (and attempted or not), oldest first, page by page."""
        after = 0
        while rows := await self.storage.ledger(
            state=state, attempted=attempted, after_id=after, limit=page
        ):
            for row in rows:
                yield row
            after = rows[-1].id

    async def _hold_again(self, claimant: str) -> None:
        now = int(self.now())
        await self.storage.hold_billed_buckets(Claim(claimant, now, now + HAND_BACK_HOLD_SECONDS))

    async def _renew(self, claimant: str) -> None:
        """Keep a hand-back's hold alive while it runs (it lapses soon after a crash)."""
        while True:
            await asyncio.sleep(HAND_BACK_HOLD_SECONDS / 5)
            await self._hold_again(claimant)

    async def _await_senders(self, other_than: str | None = None) -> str | None:
        """Wait for send passes that read the flags before the rollback: each stops before its
        next group of calls, and its claims go when it ends. None when none is left; else why
        the lists may miss rows a sender still delivers."""
        limit = self.config.cutover.sender_wait_seconds
        deadline = time.monotonic() + limit
        while held := await self.storage.live_claims(int(self.now()), other_than):
            if time.monotonic() >= deadline:
                log.warning("cutover.senders_still_running", rows=held, waited_seconds=limit)
                return (
                    f"after {limit} s, senders still held {held} rows: rows they deliver from now "
                    "on are not in these lists; run the rollback again once they stopped"
                )
            await asyncio.sleep(0.2)
        return None

    async def seam(self, start: int | None, end: int | None, org_id: str | None = None) -> Seam:
        """Who bills which buckets in `[start, end)` (bucket-aligned; InvalidInput naming the field
        otherwise): `legacy_bill_until` and, per org, the ranges the control plane bills (see
        :mod:`controlplane.seam`). The flags are read before and after the ranges, and the
        read is repeated if they moved in between, so both halves hold at one moment."""
        bucket = self.config.rollup.bucket_seconds
        problems = window_problems(start, end, bucket)
        if problems or start is None or end is None:
            raise InvalidInput(problems)
        for _ in range(5):
            before = await self.flags()
            billed = await self.storage.billed_ranges(start, end, bucket, org_id)
            after = await self.flags()
            if after.values == before.values:
                return seam_of(
                    start, end, bucket, after.authority.value, after.legacy_bill_until, billed
                )
        raise ControlPlaneError("the flags kept changing while the seam was read; retry")

    async def status(self, limit: int = 50) -> CutoverStatus:
        snapshot = await self.flags()
        history = await self.storage.audit_log(action_prefix="cutover.", limit=limit)
        return CutoverStatus(
            stage=stage_of(snapshot, history),
            flags=snapshot.to_api(),
            reconciled_clean_since=clean_since(await self.storage.reconcile_runs(limit=200)),
            history=[
                {
                    "id": r.id,
                    "at": r.at,
                    "step": r.action.removeprefix("cutover."),
                    "t": int(r.subject) if r.subject.isdigit() else None,  # T, kept as the subject
                    "actor": r.actor,
                    "reason": r.reason,
                    "forced": r.forced,
                    "group_id": r.group_id,
                }
                for r in history
            ],
        )
