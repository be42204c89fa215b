"""The ledger's storage methods, shared by the SQL plugins: usage, rollup, ledger reads,
sending.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence

from controlplane import moves
from controlplane.interfaces import (
    Attempt,
    AuditEntry,
    BilledRange,
    Carry,
    Claim,
    ClosedPeriod,
    DirtyBacklog,
    LedgerCount,
    RollupBatch,
    RollupPlanner,
    SeamRows,
    SendItem,
    Settlement,
    UsageTotal,
)
from controlplane.interfaces.storage import EventStore, LedgerStore, SendStore
from controlplane.ledger import LedgerRow, NewRow, Reason, RowState, segment
from controlplane.plugins.storage._common import (
    Reissue,
    check_flags_unchanged,
    from_row,
    ledger_row,
    orgs_with_plans,
)
from controlplane.plugins.storage.base.driver import (
    CHAIN_LOCK,
    CLAIM_LOCK,
    FLAGS_LOCK,
    Connection,
    DirtyBatch,
    Row,
    SQLDriver,
    read_flag_versions,
    read_seam,
)
from controlplane.rollup import ChainMember, rechain


class SQLEvents(SQLDriver, EventStore):
    """Usage read back; storing events and summing them per org are the dialect's."""

    async def usage(
        self, org_id: str | None, meter: str | None, start: int | None, end: int | None
    ) -> list[UsageTotal]:
        rows = await self._all("usage", org_id, meter, start, end)
        return [from_row(UsageTotal, r) for r in rows]

    async def untokened_events(self, types: Sequence[str], since_ms: int) -> int:
        if not types:
            return 0
        (row,) = await self._all("untokened_events", self._array(sorted(types)), since_ms)
        return int(row[0])


class SQLLedger(SQLDriver, LedgerStore):
    """The rollup's step (its batch taken by the dialect) and the ledger's reads."""

    @abc.abstractmethod
    async def _take_dirty(
        self,
        conn: Connection,
        last_start: int,
        org_id: str | None,
        limit: int,
        allowed: list[str] | None,
    ) -> DirtyBatch:
        """Take the rollup's next dirty buckets (see :meth:`rollup_step`)."""

    async def rollup_step(
        self,
        closed_before: int,
        bucket_seconds: int,
        limit: int,
        planner: RollupPlanner,
        org_id: str | None = None,
        unplanned_allowed: Sequence[str] | None = None,
    ) -> tuple[int, list[NewRow]]:
        last_start = closed_before - bucket_seconds
        allowed = None if unplanned_allowed is None else list(unplanned_allowed)
        now = int(time.time())

        async def work(conn: Connection) -> tuple[int, list[NewRow]]:
            batch = await self._take_dirty(conn, last_start, org_id, limit, allowed)
            if not batch.buckets:
                return 0, []
            # read by name; built directly, as these are the rollup's bulk of rows
            totals = [
                UsageTotal(r["org_id"], r["meter"], r["bucket_start"], r["value_micros"])
                for r in await conn.fetch("batch_totals", *batch.bucket_args)
            ]
            sums: dict[tuple[str, str, int], int] = {}
            revisions: dict[tuple[str, str, int], int] = {}
            chains: dict[tuple[str, str, int], dict[str, int]] = {}
            for r in await conn.fetch("batch_ledger", *batch.bucket_args):
                at_bucket = (r["org_id"], r["meter"], r["bucket_start"])
                sums[at_bucket] = sums.get(at_bucket, 0) + r["value_micros"]
                revisions[at_bucket] = max(revisions.get(at_bucket, 0), r["revision"])
                if r["value_micros"]:
                    by_chain = chains.setdefault(at_bucket, {})
                    chain = segment(r["reason"])
                    by_chain[chain] = by_chain.get(chain, 0) + r["value_micros"]
            ledger_sums = [UsageTotal(*at_bucket, value) for at_bucket, value in sums.items()]
            carries = [
                from_row(Carry, r) for r in await conn.fetch("batch_carries", *batch.org_args)
            ]
            orgs = orgs_with_plans(await conn.fetch("batch_orgs", *batch.org_args))
            newest: dict[tuple[str, int], tuple[int, str]] = {}
            for r in await conn.fetch("batch_token_plans", *batch.bucket_args, bucket_seconds):
                key, claim = (r["org_id"], r["bucket_start"]), (r["plan_issued_at"], r["plan"])
                newest[key] = max(newest.get(key, claim), claim)
            plan = planner(
                RollupBatch(
                    totals=totals,
                    ledger_sums=ledger_sums,
                    ledger_chains=chains,
                    revisions=revisions,
                    carries=carries,
                    orgs=orgs,
                    token_plans={key: claim[1] for key, claim in newest.items()},
                    token_issued={key: claim[0] for key, claim in newest.items()},
                )
            )
            await conn.bulk(
                "insert_rows",
                [
                    (
                        r.identifier,
                        r.org_id,
                        r.meter,
                        r.bucket_start,
                        r.bucket_end,
                        r.revision,
                        r.value_micros,
                        r.quantity,
                        r.state.value,
                        r.reason,
                        r.plan_source,
                    )
                    for r in plan.rows
                ],
                now,
            )
            await conn.bulk(
                "upsert_carries",
                [(c.org_id, c.meter, c.segment, c.exact_micros, c.quantity) for c in plan.carries],
            )
            await conn.bulk(
                "hold_dirty",
                [
                    (
                        h.org_id,
                        h.bucket_start,
                        batch.marks.get((h.org_id, h.bucket_start)),
                        h.reason,
                    )
                    for h in plan.held
                ],
            )
            await conn.execute("clear_dirty", *batch.clear_args)
            return batch.buckets, plan.rows

        return await self._tx("rollup", work, CHAIN_LOCK)

    async def unplanned_orgs(self, closed_before: int, bucket_seconds: int) -> list[str]:
        rows = await self._all("unplanned_orgs", closed_before - bucket_seconds)
        return [r["org_id"] for r in rows]

    async def dirty_backlog(self, closed_before: int, bucket_seconds: int) -> DirtyBacklog:
        (row,) = await self._all("dirty_backlog", closed_before - bucket_seconds)
        return from_row(DirtyBacklog, row)

    async def ledger(
        self,
        *,
        org_id: str | None = None,
        state: RowState | None = None,
        start: int | None = None,
        end: int | None = None,
        limit: int = 1000,
        attempted: bool | None = None,
        after_id: int = 0,
    ) -> list[LedgerRow]:
        rows = await self._all(
            "ledger",
            org_id,
            state.value if state else None,
            start,
            end,
            limit,
            attempted,
            after_id,
        )
        return [ledger_row(r) for r in rows]

    async def ledger_counts(self) -> list[LedgerCount]:
        rows = await self._all("ledger_counts")
        return [LedgerCount(r["state"], r["reason"], r["rows"]) for r in rows]

    async def late_rows(self, period: ClosedPeriod) -> list[LedgerRow]:
        return await self._period_rows("late_rows", period)

    async def unsure_rows(self, period: ClosedPeriod) -> list[LedgerRow]:
        return await self._period_rows("unsure_rows", period)

    async def _period_rows(self, query: str, period: ClosedPeriod) -> list[LedgerRow]:
        args = (period.org_id, period.period_start, period.period_end, period.finalized_at)
        return [ledger_row(r) for r in await self._all(query, *args)]


class SQLSending(SQLDriver, SendStore):
    """Claims, attempts, settlements, cancellations and re-issues, and the seam."""

    async def sendable(
        self,
        after_id: int,
        limit: int,
        org_id: str | None = None,
        until: int | None = None,
        *,
        claim: Claim,
        billed_only: bool = False,
        billed_before: int | None = None,
    ) -> list[SendItem]:
        async def work(conn: Connection) -> list[Row]:
            return await conn.fetch(
                "sendable",
                after_id,
                limit,
                org_id,
                until,
                claim.claimant,
                claim.at,
                claim.until,
                True if billed_only else None,
                billed_before,
            )

        # claim transactions run one at a time, so the test of the lanes in use is exact
        rows = await self._tx("claim", work, CLAIM_LOCK)
        rows.sort(key=lambda r: r["id"])
        return [
            SendItem(row=ledger_row(r), customer=r["customer"], billed=bool(r["billed"]))
            for r in rows
        ]

    async def release_claims(self, claimant: str) -> None:
        await self._tx("release claims", lambda conn: conn.execute("release_claims", claimant))

    async def live_claims(self, at: int, other_than: str | None = None) -> int:
        (row,) = await self._all("live_claims", at, other_than)
        return int(row[0])

    async def hold_billed_buckets(self, claim: Claim) -> bool:
        async def work(conn: Connection) -> bool:
            (row,) = await conn.fetch("held_by_others", claim.claimant, claim.at)
            if row["held"]:
                return False
            await conn.execute("hold_billed_buckets", claim.claimant, claim.until, claim.at)
            return True

        return await self._tx("hold billed buckets", work, CLAIM_LOCK)

    async def seam(self, bucket_start: int) -> SeamRows:
        return await self._read("read", lambda conn: read_seam(conn, bucket_start))

    async def billed_ranges(
        self, start: int, end: int, bucket_seconds: int, org_id: str | None = None
    ) -> list[BilledRange]:
        rows = await self._all("billed_ranges", start, end, bucket_seconds, org_id)
        return [from_row(BilledRange, r) for r in rows]

    async def record_attempts(
        self,
        row_ids: Sequence[int],
        at: int,
        claim: Claim | None = None,
        *,
        flag_versions: Mapping[str, int] | None = None,
        series: Mapping[int, Attempt] | None = None,
    ) -> dict[int, int]:
        ids = sorted(row_ids)
        calls = [(series or {}).get(i) for i in ids]

        async def work(conn: Connection) -> dict[int, int]:
            if flag_versions is not None:
                # shared: senders do not wait for each other, only for a flag write
                await conn.lock(FLAGS_LOCK, shared=True)
                check_flags_unchanged(flag_versions, await read_flag_versions(conn))
            rows = await conn.fetch(
                "record_attempts",
                self._array(ids),
                at,
                claim.claimant if claim else None,
                claim.until if claim else None,
                self._array([c.customer if c else None for c in calls]),
                self._array([c.timestamp if c else None for c in calls]),
                self._array([c.key if c else None for c in calls]),
            )
            return {r["id"]: r["quantity"] for r in rows}

        return await self._tx("record attempts", work)

    async def release_attempts(self, row_ids: Sequence[int]) -> None:
        await self._tx(
            "release attempts",
            lambda conn: conn.bulk("release_attempts", [(i,) for i in row_ids]),
        )

    async def settle(self, settlements: Sequence[Settlement], at: int, claimant: str = "") -> int:
        excluding = any(s.state is RowState.EXCLUDED for s in settlements)

        async def work(conn: Connection) -> int:
            ids = self._array(sorted(s.row_id for s in settlements))
            open_ids = {r["id"] for r in await conn.fetch("settleable", ids)}
            moving = [s for s in settlements if s.row_id in open_ids]
            if not moving:
                return 0
            await conn.bulk(
                "settle_rows",
                [
                    (
                        s.row_id,
                        s.state.value,
                        s.reason,
                        s.detail,
                        s.provider_id,
                        at if s.state is RowState.SENT else None,
                    )
                    for s in moving
                ],
                at,
            )
            audit = [s.audit for s in moving if s.audit is not None]
            excluded = [s.row_id for s in moving if s.state is RowState.EXCLUDED]
            if excluded:
                await self._requantify(conn, excluded, at, claimant)
            await self._append_audit(conn, audit, at)
            return len(moving)

        return await self._tx("settle", work, *((CHAIN_LOCK,) if excluding else ()))

    async def _requantify(
        self, conn: Connection, row_ids: list[int], at: int, claimant: str
    ) -> None:
        """Rows just excluded (or cancelled) left the billable rounding chain: store what
        :func:`controlplane.rollup.rechain` re-derives for every chain of their (org, meter)."""
        for pair in await conn.fetch("row_chains", self._array(row_ids)):
            org_id, meter = pair["org_id"], pair["meter"]
            rows = await conn.fetch("chain_rows", org_id, meter, claimant, at)
            changed, carries = rechain(org_id, meter, [from_row(ChainMember, r) for r in rows])
            await conn.bulk("set_quantities", list(changed.items()), at)
            await conn.bulk(
                "upsert_carries",
                [(c.org_id, c.meter, c.segment, c.exact_micros, c.quantity) for c in carries],
            )

    async def cancel_rows(
        self, row_ids: Sequence[int], at: int, actor: str, reason: str, detail: str | None = None
    ) -> int:
        async def work(conn: Connection) -> int:
            found = await conn.fetch("cancellable", self._array(sorted(row_ids)))
            if not found:
                return 0
            await conn.bulk("cancel_rows", [(r["id"],) for r in found], reason, detail, at)
            await self._append_audit(
                conn,
                [
                    moves.cancelled(r["identifier"], r["state"], r["quantity"], actor, reason)
                    for r in found
                ],
                at,
            )
            # they left the billable rounding chain: its fractions stay behind
            await self._requantify(conn, [r["id"] for r in found], at, "")
            return len(found)

        return await self._tx("cancel rows", work, CHAIN_LOCK)

    async def reissue_rows(
        self,
        row_ids: Sequence[int],
        at: int,
        actor: str,
        detail: str,
        *,
        handed_back: bool = False,
    ) -> list[NewRow]:
        async def work(conn: Connection) -> list[NewRow]:
            rows = await conn.fetch("reissuable", self._array(sorted(row_ids)), handed_back)
            found = [Reissue(**dict(r)) for r in rows]
            new: list[NewRow] = []
            taken: dict[tuple[str, str, int], int] = {}
            for old in found:
                row = old.next(detail, taken)
                why = f"{detail}; re-issued as {row.identifier}"
                await conn.bulk("cancel_rows", [(old.id,)], Reason.REISSUED.value, why, at)
                await conn.execute(
                    "insert_reissue",
                    row.identifier,
                    row.org_id,
                    row.meter,
                    row.bucket_start,
                    row.bucket_end,
                    row.revision,
                    row.value_micros,
                    row.quantity,
                    row.detail,
                    at,
                    row.plan_source,
                )
                new.append(row)
            await self._append_audit(
                conn,
                [
                    moves.reissued(
                        old.identifier, old.state, old.quantity, row.identifier, actor, detail
                    )
                    for old, row in zip(found, new, strict=True)
                ],
                at,
            )
            if found:
                await self._requantify(conn, [old.id for old in found], at, "")
            return new

        return await self._tx("reissue rows", work, CHAIN_LOCK)

    async def offset_rows(
        self, row_ids: Sequence[int], at: int, actor: str, detail: str
    ) -> list[LedgerRow]:
        async def work(conn: Connection) -> list[LedgerRow]:
            new: list[LedgerRow] = []
            taken: dict[tuple[str, str, int], int] = {}  # revisions given in this call
            for old in await conn.fetch("offsettable", self._array(sorted(row_ids))):
                bucket = (old["org_id"], old["meter"], old["bucket_start"])
                revision = taken[bucket] = taken.get(bucket, int(old["last_revision"])) + 1
                offset = NewRow(
                    org_id=old["org_id"],
                    meter=old["meter"],
                    bucket_start=old["bucket_start"],
                    bucket_end=old["bucket_end"],
                    revision=revision,
                    value_micros=-old["value_micros"],
                    quantity=-old["quantity"],
                    state=RowState.PENDING,
                )
                (row,) = await conn.fetch(
                    "insert_offset",
                    offset.identifier,
                    offset.org_id,
                    offset.meter,
                    offset.bucket_start,
                    offset.bucket_end,
                    offset.revision,
                    offset.value_micros,
                    offset.quantity,
                    f"offsets {old['identifier']}: {detail}",
                    old["id"],
                    at,
                    old["attempt_customer"],
                    old["attempt_timestamp"],
                )
                new.append(ledger_row(row))
            await self._append_audit(
                conn,
                [
                    moves.offset_appended(
                        row.identifier, row.offsets_id or 0, row.quantity, actor, detail
                    )
                    for row in new
                ],
                at,
            )
            return new

        return await self._tx("offset rows", work, CHAIN_LOCK)

    async def complete_offsets(self, settlements: Sequence[Settlement], at: int, actor: str) -> int:
        async def work(conn: Connection) -> int:
            ids = self._array(sorted(s.row_id for s in settlements))
            pending = {r["id"]: r for r in await conn.fetch("pending_offsets", ids)}
            moving = [s for s in settlements if s.row_id in pending]
            if not moving:
                return 0
            rows = [(s.row_id, "sent", None, s.detail, s.provider_id, at) for s in moving]
            await conn.bulk("settle_rows", rows, at)
            audit: list[AuditEntry] = []
            for o in (pending[s.row_id] for s in moving):
                why = f"offset by {o['identifier']}"
                if o["undoes"] is None:
                    if await conn.fetch("offset_target", o["offsets_id"], why, at):
                        audit.append(
                            moves.offset(o["original"], o["identifier"], o["quantity"], actor)
                        )
                # an offset's offset: the row the first one took off is billed again
                elif await conn.fetch("cancel_offset", o["offsets_id"], why, at):
                    await conn.fetch("reinstate_offset", o["undoes"], f"{why}, undone", at)
                    audit.append(
                        moves.offset_undone(o["original"], o["identifier"], o["quantity"], actor)
                    )
            await self._append_audit(conn, audit, at)
            # the rows leave (or rejoin) the billable chain
            await self._requantify(conn, [pending[s.row_id]["offsets_id"] for s in moving], at, "")
            return len(audit)

        return await self._tx("complete offsets", work, CHAIN_LOCK)

    async def unsent_offsets(self) -> list[LedgerRow]:
        return [ledger_row(r) for r in await self._all("unsent_offsets")]
