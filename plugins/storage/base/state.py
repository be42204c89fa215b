"""Orgs, flags, audit and job runs: their storage methods, shared by the SQL plugins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from controlplane.interfaces import (
    AuditEntry,
    AuditRecord,
    FlagGuard,
    FlagWrite,
    JobRun,
    Org,
    RuntimeFlag,
    StaticFlags,
)
from controlplane.interfaces.storage import AuditStore, FlagStore, JobStore, OrgStore
from controlplane.plugins.storage._common import (
    STATIC_FLAGS,
    audit_record,
    check_customer_free,
    check_flag_versions,
    check_static,
    from_row,
    org_record,
)
from controlplane.plugins.storage.base.driver import (
    AUDIT_LOCK,
    FLAGS_LOCK,
    Connection,
    SQLDriver,
    read_flag_versions,
    read_seam,
)

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


class SQLOrgs(SQLDriver, OrgStore):
    """Orgs, customers and plan periods."""

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
                await conn.execute("release_org_buckets", org_id)
            await self._append_audit(conn, [audit], at)

        await self._tx("set org", work)
        org = await self.get_org(org_id)
        assert org is not None
        return org

    async def orgs_without_customer(self, plan: str, at: int) -> list[str]:
        return [r["org_id"] for r in await self._all("plan_orgs_without_customer", plan, at)]

    async def subscription_statuses(self) -> dict[str, int]:
        rows = await self._all("org_subscription_statuses")
        return {r["status"]: int(r["orgs"]) for r in rows}


class SQLFlags(SQLDriver, FlagStore):
    """Runtime flags and the static layers' record."""

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
            versions = await read_flag_versions(conn)
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
                await guard(lambda start: read_seam(conn, start))
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


class SQLAudit(SQLDriver, AuditStore):
    """The audit log (appended through :meth:`SQLDriver._append_audit`)."""

    async def append_audit(self, entries: Sequence[AuditEntry], at: int) -> None:
        await self._tx("append audit", lambda conn: self._append_audit(conn, entries, at))

    async def audit_log(
        self, *, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        return [audit_record(r) for r in await self._all("audit_log", action_prefix, limit)]

    async def audit_chain(self, after_id: int, limit: int) -> list[AuditRecord]:
        return [audit_record(r) for r in await self._all("audit_chain", after_id, limit)]


class SQLJobs(SQLDriver, JobStore):
    """Job runs."""

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
