"""What both SQL storage plugins share: every storage method whose logic does not depend on the
database, written once over a narrow driver contract.

A plugin (`sqlite.py`, `postgres.py`) keeps its dialect and its driver, nothing else:

- its queries, by name, in its `.sql` file: the same names, the same arguments in the same order
  (`$1` in PostgreSQL, `?1` in SQLite), the columns the records are decoded from by name;
- :class:`Connection`: one driver connection running those queries, with the dialect's bulk
  style (`bulk`: one statement per row, or one with each column as an array) and its
  transaction advisory locks (`lock`; a single-writer store needs none);
- :meth:`SQLStorage._tx` and :meth:`SQLStorage._read`: transactions and reads, with the
  driver's retries, and its errors translated into :class:`StorageError` at this boundary;
- :meth:`SQLStorage._array`: a list as one query parameter;
- what really differs: opening and closing, storing a batch of events, taking the rollup's
  batch of dirty buckets (:meth:`SQLStorage._take_dirty`), summing usage per org for parity,
  and the migration session (see :mod:`controlplane.migrations`).

Locks are named (:data:`CHAIN_LOCK` ...); every transaction that rewrites a rounding chain holds
:data:`CHAIN_LOCK`, every audited write takes :data:`AUDIT_LOCK` before reading the chain's end.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple, TypeVar

import msgspec

from controlplane import audit as audit_chain
from controlplane import migrations
from controlplane.errors import ConfigError
from controlplane.interfaces import (
    Attempt,
    AuditEntry,
    AuditRecord,
    Carry,
    CatalogVersion,
    Claim,
    ClosedPeriod,
    DirtyBacklog,
    FlagGuard,
    FlagWrite,
    JobRun,
    LedgerCount,
    MigrationStatus,
    Org,
    OrgChange,
    OrgDrift,
    ParityAlert,
    ParityRun,
    RollupBatch,
    RollupPlanner,
    RuntimeFlag,
    SeamRows,
    SendItem,
    Settlement,
    StaticFlags,
    Storage,
    UsageTotal,
    WebhookRecord,
)
from controlplane.ledger import LedgerRow, NewRow, Reason, RowState
from controlplane.plugins.storage._common import (
    STATIC_FLAGS,
    Reissue,
    audit_record,
    chains,
    check_customer_free,
    check_flag_versions,
    check_flags_unchanged,
    check_static,
    from_row,
    ledger_row,
    org_record,
    orgs_with_plans,
    parity_run,
)
from controlplane.rollup import carry, requantify

T = TypeVar("T")
Row = Any  # a driver row: read by column name (sqlite3.Row, asyncpg.Record)
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()

CHAIN_LOCK = "rounding-chains"
CLAIM_LOCK = "sender-claims"
AUDIT_LOCK = "audit-chain"
FLAGS_LOCK = "flags"


class Connection(abc.ABC):
    """One driver connection, in a transaction or a read; queries are named, never SQL text."""

    @abc.abstractmethod
    async def fetch(self, query: str, *args: Any) -> list[Row]:
        """Every row the named query returns."""

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        rows = await self.fetch(query, *args)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: Any) -> Any:
        row = await self.fetchrow(query, *args)
        return None if row is None else row[0]

    @abc.abstractmethod
    async def execute(self, query: str, *args: Any) -> None: ...

    @abc.abstractmethod
    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        """The named statement once per row of arguments."""

    @abc.abstractmethod
    async def bulk(self, query: str, rows: Sequence[Sequence[Any]], *args: Any) -> None:
        """The named statement over `rows`: its arguments are a row's values, then `args`
        (the dialect runs it once per row, or once with each column as an array). Nothing
        runs without rows."""

    @abc.abstractmethod
    async def lock(self, name: str, *, shared: bool = False) -> None:
        """Hold the lock `name` (`shared` with other shared holders) until the transaction
        ends; a store that runs one write transaction at a time has nothing to do."""


class DirtyBatch(NamedTuple):
    """The dirty buckets one rollup step took, as the dialect passes them to its queries."""

    buckets: int  # how many were taken
    bucket_args: tuple[Any, ...] = ()  # of `batch_totals` and `batch_ledger`
    org_args: tuple[Any, ...] = ()  # of `batch_carries` and `batch_orgs`
    clear_args: tuple[Any, ...] = ()  # of `clear_dirty`
    marks: Mapping[tuple[str, int], int] = {}  # the mark read per (org, bucket), if any


async def _seam(conn: Connection, bucket_start: int) -> SeamRows:
    (row,) = await conn.fetch("seam", bucket_start)
    return SeamRows(reached=int(row["reached"]), excluded_before_bill_from=int(row["excluded"]))


async def _flag_versions(conn: Connection) -> dict[str, int]:
    return {r["name"]: r["version"] for r in await conn.fetch("flag_versions")}


class SQLStorage(Storage):
    """Every storage method over the driver contract; a plugin adds its dialect and driver."""

    # the driver contract -------------------------------------------------------------------

    @abc.abstractmethod
    async def _tx(self, what: str, work: Callable[[Connection], Awaitable[T]], *locks: str) -> T:
        """Run `work` in one write transaction (after taking `locks`, in order): all of it
        commits, or none of it. Driver errors become StorageError naming `what`."""

    @abc.abstractmethod
    async def _read(self, what: str, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `work` on a connection for reading, outside any write transaction."""

    @abc.abstractmethod
    def _array(self, values: Sequence[Any]) -> Any:
        """A list as one query parameter."""

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

    @abc.abstractmethod
    def _migrating(self) -> AbstractAsyncContextManager[migrations.Session]:
        """A migration session, alone among every process sharing the store."""

    async def _all(self, query: str, *args: Any) -> list[Row]:
        """The rows of one named read."""
        return await self._read("read", lambda conn: conn.fetch(query, *args))

    # schema -------------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        async with self._migrating() as session:
            return await migrations.migrate(session, self.name)

    async def migration_status(self) -> MigrationStatus:
        async with self._migrating() as session:
            applied, pending = await migrations.status(session, self.name)
        return MigrationStatus(applied=applied, pending=pending)

    async def ping(self) -> None:
        await self._all("ping")

    async def pin_setting(self, key: str, value: str) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute("put_setting", key, value)  # unless one is there
            pinned = await conn.fetchval("get_setting", key)
            if pinned != value:
                raise ConfigError(
                    f"rollup.{key}: the data was written with {key} = {pinned}; "
                    f"it cannot change to {value}"
                )

        await self._tx("pin setting", work)

    # usage --------------------------------------------------------------------------------

    async def usage(
        self, org_id: str | None, meter: str | None, start: int | None, end: int | None
    ) -> list[UsageTotal]:
        rows = await self._all("usage", org_id, meter, start, end)
        return [from_row(UsageTotal, r) for r in rows]

    # rollup -------------------------------------------------------------------------------

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
            totals = [
                from_row(UsageTotal, r)
                for r in await conn.fetch("batch_totals", *batch.bucket_args)
            ]
            ledger_sums: list[UsageTotal] = []
            revisions: dict[tuple[str, str, int], int] = {}
            for r in await conn.fetch("batch_ledger", *batch.bucket_args):
                total = from_row(UsageTotal, r)
                ledger_sums.append(total)
                revisions[(total.org_id, total.meter, total.bucket_start)] = r["revision"]
            carries = [
                from_row(Carry, r) for r in await conn.fetch("batch_carries", *batch.org_args)
            ]
            orgs = orgs_with_plans(await conn.fetch("batch_orgs", *batch.org_args))
            plan = planner(
                RollupBatch(
                    totals=totals,
                    ledger_sums=ledger_sums,
                    revisions=revisions,
                    carries=carries,
                    orgs=orgs,
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

    # ledger -------------------------------------------------------------------------------

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
        rows = await self._all(
            "late_rows",
            period.org_id,
            period.period_start,
            period.period_end,
            period.finalized_at,
        )
        return [ledger_row(r) for r in rows]

    # sending ------------------------------------------------------------------------------

    async def sendable(
        self,
        after_id: int,
        limit: int,
        org_id: str | None = None,
        until: int | None = None,
        *,
        claim: Claim,
    ) -> list[SendItem]:
        async def work(conn: Connection) -> list[Row]:
            return await conn.fetch(
                "sendable", after_id, limit, org_id, until, claim.claimant, claim.at, claim.until
            )

        # claim transactions run one at a time, so the test of the lanes in use is exact
        rows = await self._tx("claim", work, CLAIM_LOCK)
        rows.sort(key=lambda r: r["id"])
        return [SendItem(row=ledger_row(r), customer=r["customer"]) for r in rows]

    async def release_claims(self, claimant: str) -> None:
        await self._tx("release claims", lambda conn: conn.execute("release_claims", claimant))

    async def live_claims(self, at: int) -> int:
        (row,) = await self._all("live_claims", at)
        return int(row[0])

    async def seam(self, bucket_start: int) -> SeamRows:
        return await self._read("read", lambda conn: _seam(conn, bucket_start))

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
                check_flags_unchanged(flag_versions, await _flag_versions(conn))
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

    async def settle(
        self, settlements: Sequence[Settlement], at: int, actor: str, claimant: str = ""
    ) -> int:
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
            sent = [
                AuditEntry(
                    action="ledger.sent",
                    subject=s.identifier,
                    actor=actor,
                    after={
                        "quantity": s.quantity,
                        "customer": s.customer,
                        "provider_id": s.provider_id,
                    },
                )
                for s in moving
                if s.state is RowState.SENT
            ]
            excluded = [s.row_id for s in moving if s.state is RowState.EXCLUDED]
            if excluded:
                await self._requantify(conn, excluded, at, claimant)
            await self._append_audit(conn, sent, at)
            return len(moving)

        return await self._tx("settle", work, *((CHAIN_LOCK,) if excluding else ()))

    async def _requantify(
        self, conn: Connection, row_ids: list[int], at: int, claimant: str
    ) -> None:
        """Rows just excluded (or cancelled) left the billable rounding chain: re-derive the
        quantities of every chain of their (org, meter) and store the carries."""
        for pair in await conn.fetch("row_chains", self._array(row_ids)):
            org_id, meter = pair["org_id"], pair["meter"]
            rows = await conn.fetch("chain_rows", org_id, meter, claimant, at)
            for name, chain in chains(rows).items():
                changed, exact, whole = requantify(chain)
                await conn.bulk("set_quantities", list(changed.items()), at)
                c = carry(org_id, meter, name, exact, whole)
                await conn.execute("upsert_carry", org_id, meter, name, c.exact_micros, c.quantity)

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
                    AuditEntry(
                        action="ledger.cancelled",
                        subject=r["identifier"],
                        actor=actor,
                        reason=reason,
                        before={"state": r["state"]},
                        after={"state": "cancelled", "quantity": r["quantity"]},
                    )
                    for r in found
                ],
                at,
            )
            # they left the billable rounding chain: its fractions stay behind
            await self._requantify(conn, [r["id"] for r in found], at, "")
            return len(found)

        return await self._tx("cancel rows", work, CHAIN_LOCK)

    async def reissue_rows(
        self, row_ids: Sequence[int], at: int, actor: str, detail: str
    ) -> list[NewRow]:
        async def work(conn: Connection) -> list[NewRow]:
            rows = await conn.fetch("reissuable", self._array(sorted(row_ids)))
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
                )
                new.append(row)
            await self._append_audit(
                conn,
                [old.audit(row, actor, detail) for old, row in zip(found, new, strict=True)],
                at,
            )
            if found:
                await self._requantify(conn, [old.id for old in found], at, "")
            return new

        return await self._tx("reissue rows", work, CHAIN_LOCK)

    # orgs ---------------------------------------------------------------------------------

    async def get_org(self, org_id: str) -> Org | None:
        async def read(conn: Connection) -> Org | None:
            row = await conn.fetchrow("get_org", org_id)
            if row is None:
                return None
            return org_record(row, await conn.fetch("org_plans", org_id))

        return await self._read("read org", read)

    async def set_org(
        self,
        org_id: str,
        *,
        customer: str | None,
        plan: str | None,
        effective_from: int,
        at: int,
        audit: AuditEntry,
    ) -> Org:
        async def work(conn: Connection) -> None:
            if customer is not None:
                await conn.lock(customer)  # one claim of a customer at a time
                owner = await conn.fetchval("customer_owner", customer, org_id)
                check_customer_free(customer, org_id, owner)
            await conn.execute("upsert_org", org_id, customer, at)
            if plan is not None:
                await conn.execute("upsert_plan", org_id, effective_from, plan)
            await self._append_audit(conn, [audit], at)

        await self._tx("set org", work)
        org = await self.get_org(org_id)
        assert org is not None
        return org

    async def orgs_without_customer(self, plan: str, at: int) -> list[str]:
        return [r["org_id"] for r in await self._all("plan_orgs_without_customer", plan, at)]

    # flags --------------------------------------------------------------------------------

    async def runtime_flags(self) -> dict[str, RuntimeFlag]:
        rows = await self._all("runtime_flags")
        return {r["name"]: from_row(RuntimeFlag, r, value=_decode.decode(r["value"])) for r in rows}

    async def write_flags(
        self,
        writes: Sequence[FlagWrite],
        audit: Sequence[AuditEntry],
        at: int,
        *,
        guard: FlagGuard | None = None,
        flag_versions: Mapping[str, int] | None = None,
        static: StaticFlags | None = None,
    ) -> dict[str, RuntimeFlag]:
        async def work(conn: Connection) -> dict[str, RuntimeFlag]:
            versions = await _flag_versions(conn)
            check_flag_versions(
                {**(flag_versions or {}), **{w.name: w.expected_version for w in writes}},
                versions,
            )
            if static is not None:
                check_static(static, await conn.fetchval("get_setting_for_update", STATIC_FLAGS))
                await conn.execute(
                    "upsert_setting", STATIC_FLAGS, _json.encode(static.after).decode()
                )
            if guard is not None:
                await guard(lambda start: _seam(conn, start))
            out: dict[str, RuntimeFlag] = {}
            for w in writes:
                version = versions.get(w.name, 0) + 1
                value = _json.encode(w.value).decode()
                await conn.execute("upsert_flag", w.name, value, version, at)
                out[w.name] = RuntimeFlag(
                    name=w.name, value=w.value, version=version, updated_at=at
                )
            await self._append_audit(conn, audit, at)
            return out

        # the flags lock first (it waits for the senders recording attempts under the flags
        # they read, which take no other lock), then the audit lock, as every appender does
        return await self._tx("write flags", work, FLAGS_LOCK, AUDIT_LOCK)

    async def static_flags(self) -> dict[str, Any] | None:
        rows = await self._all("get_setting", STATIC_FLAGS)
        return _decode.decode(rows[0]["value"]) if rows else None

    # audit --------------------------------------------------------------------------------

    async def _append_audit(self, conn: Connection, entries: Sequence[AuditEntry], at: int) -> None:
        if not entries:
            return
        await conn.lock(AUDIT_LOCK)
        prev = await conn.fetchval("last_audit_hash") or audit_chain.GENESIS
        await conn.executemany("insert_audit", audit_chain.chain_rows(prev, at, entries, self.sign))

    async def append_audit(self, entries: Sequence[AuditEntry], at: int) -> None:
        await self._tx("append audit", lambda conn: self._append_audit(conn, entries, at))

    async def audit_log(
        self, *, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        return [audit_record(r) for r in await self._all("audit_log", action_prefix, limit)]

    async def audit_chain(self, after_id: int, limit: int) -> list[AuditRecord]:
        return [audit_record(r) for r in await self._all("audit_chain", after_id, limit)]

    # jobs ---------------------------------------------------------------------------------

    async def record_job_run(self, run: JobRun) -> None:
        counts = _json.encode(run.counts).decode()
        await self._tx(
            "record job run",
            lambda conn: conn.execute(
                "insert_job_run",
                run.job,
                run.started_at,
                run.ended_at,
                run.outcome,
                counts,
                run.error,
            ),
        )

    async def job_runs(self, job: str | None = None, limit: int = 50) -> list[JobRun]:
        rows = await self._all("job_runs", job, limit)
        return [from_row(JobRun, r, counts=_decode.decode(r["counts"])) for r in rows]

    async def last_job_success(self, job: str) -> float | None:
        rows = await self._all("last_job_success", job)
        return float(rows[0]["ended_at"]) if rows else None

    # parity -------------------------------------------------------------------------------

    async def record_parity_run(
        self, run: ParityRun, drifts: Sequence[OrgDrift], alert: ParityAlert | None
    ) -> int | None:
        async def work(conn: Connection) -> int | None:
            run_id: int | None = await conn.fetchval(
                "insert_parity_run",
                run.meter,
                run.bucket_start,
                run.bucket_end,
                run.checked_at,
                run.orgs,
                run.mismatches,
                run.material,
                run.controlplane_micros,
                run.legacy_micros,
                run.worst_org,
                run.worst_drift_micros,
                run.worst_relative,
                run.clean,
                run.alarming,
                run.alarm_since,
            )
            if run_id is None:
                return None  # that bucket was checked already
            await conn.executemany(
                "insert_parity_mismatch",
                [(run_id, d.org_id, d.controlplane_micros, d.legacy_micros) for d in drifts],
            )
            if alert is not None:
                await _insert_alert(conn, alert)
            return run_id

        return await self._tx("recording a parity run", work)

    async def parity_runs(
        self, meter: str, *, limit: int = 100, start: int | None = None, end: int | None = None
    ) -> list[ParityRun]:
        return [parity_run(r) for r in await self._all("parity_runs", meter, start, end, limit)]

    async def parity_run(self, run_id: int) -> tuple[ParityRun, list[OrgDrift]] | None:
        rows = await self._all("parity_run", run_id)
        if not rows:
            return None
        drifts = await self._all("parity_run_mismatches", run_id)
        return parity_run(rows[0]), [from_row(OrgDrift, d) for d in drifts]

    async def parity_clean_tail(self, meter: str) -> list[int]:
        return [r["bucket_start"] for r in await self._all("parity_clean_tail", meter)]

    async def parity_alerts(
        self,
        meter: str,
        *,
        since: int | None = None,
        states: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[ParityAlert]:
        rows = await self._all(
            "parity_alerts",
            meter,
            since,
            None if states is None else self._array(list(states)),
            limit,
        )
        return [from_row(ParityAlert, r) for r in rows]

    async def record_alert(self, alert: ParityAlert) -> int | None:
        return await self._tx("recording an alert", lambda conn: _insert_alert(conn, alert))

    async def update_parity_alert(
        self, alert_id: int, *, state: str, attempts: int, sent_at: int | None, error: str | None
    ) -> None:
        await self._tx(
            "update parity alert",
            lambda conn: conn.execute(
                "update_parity_alert", state, attempts, sent_at, error, alert_id
            ),
        )

    # catalog and webhooks -----------------------------------------------------------------

    async def catalog_version(self, version: int | None = None) -> CatalogVersion | None:
        if version is None:
            rows = await self._all("latest_catalog")
        else:
            rows = await self._all("catalog_version", version)
        if not rows:
            return None
        return from_row(CatalogVersion, rows[0], catalog=_decode.decode(rows[0]["catalog"]))

    async def publish_catalog(
        self, catalog: dict[str, Any], digest: str, actor: str, at: int, audit: AuditEntry
    ) -> CatalogVersion:
        async def work(conn: Connection) -> int:
            version = int(
                await conn.fetchval(
                    "insert_catalog", at, actor, digest, _json.encode(catalog).decode()
                )
            )
            after = dict(audit.after) if isinstance(audit.after, dict) else {}
            await self._append_audit(
                conn, [msgspec.structs.replace(audit, after={**after, "version": version})], at
            )
            return version

        # the audit lock first: publishers queue up, and each numbers after the last
        version = await self._tx("publishing the catalog", work, AUDIT_LOCK)
        return CatalogVersion(
            version=version, published_at=at, actor=actor, digest=digest, catalog=catalog
        )

    async def webhook_outcome(self, event_id: str) -> str | None:
        rows = await self._all("webhook_event", event_id)
        return str(rows[0]["outcome"]) if rows else None

    async def record_webhook(
        self,
        record: WebhookRecord,
        at: int,
        *,
        org: OrgChange | None = None,
        closed: ClosedPeriod | None = None,
        audit: Sequence[AuditEntry] = (),
    ) -> bool:
        async def work(conn: Connection) -> bool:
            inserted = await conn.fetchval(
                "insert_webhook_event",
                record.event_id,
                record.type,
                record.created,
                at,
                record.outcome,
            )
            if inserted is None:
                return False
            if org is not None:
                await conn.execute("upsert_org", org.org_id, org.customer, at)
                row = await conn.fetchrow("org_subscription", org.org_id)
                subscription, status = (row[0], row[1]) if row else (None, None)
                await conn.execute(
                    "set_org_subscription",
                    org.subscription or subscription,
                    org.subscription_status or status,
                    at,
                    org.org_id,
                )
                if org.plan is not None:
                    await conn.execute("upsert_plan", org.org_id, org.effective_from, org.plan)
            if closed is not None:
                await conn.execute(
                    "insert_closed_period",
                    closed.invoice_id,
                    closed.org_id,
                    closed.period_start,
                    closed.period_end,
                    closed.finalized_at,
                )
            await self._append_audit(conn, audit, at)
            return True

        return await self._tx(f"recording webhook {record.event_id}", work)

    async def org_for_billing(
        self, *, subscription: str | None, customer: str | None
    ) -> str | None:
        if subscription:
            rows = await self._all("org_by_subscription", subscription)
            if rows:
                return str(rows[0]["org_id"])
        if customer:
            rows = await self._all("org_by_customer", customer)
            if rows:
                return str(rows[0]["org_id"])
        return None

    async def closed_periods(self, org_ids: Sequence[str]) -> list[ClosedPeriod]:
        rows = await self._all("closed_periods", self._array(list(org_ids)))
        return [from_row(ClosedPeriod, r) for r in rows]


async def _insert_alert(conn: Connection, alert: ParityAlert) -> int | None:
    """The alert's id, or None when one for its (meter, bucket) exists already."""
    a = alert
    alert_id: int | None = await conn.fetchval(
        "insert_alert", a.meter, a.bucket_start, a.dedup_key, a.text, a.state, a.created_at
    )
    return alert_id
