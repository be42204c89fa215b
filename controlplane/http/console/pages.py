"""The console's pages (GET, scope `read`): overview, parity, ledger, cutover, orgs, audit.

Each page reads the core (never storage) and renders one template; the cutover page is also
what the cutover actions (:mod:`controlplane.http.console.actions`) answer with.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import FromQuery, QueryParameter
from litestar.response import Template

from controlplane import health as job_health
from controlplane.core import ControlPlane
from controlplane.errors import ControlPlaneError
from controlplane.http.console import charts
from controlplane.http.console.session import Session, console_session, current
from controlplane.http.params import CP
from controlplane.ledger import RowState
from controlplane.parity import comparison_api
from controlplane.reconcile import clean_since as reconcile_clean_since
from controlplane.times import parse_instant
from controlplane.units import format_micros

NAV = [
    ("overview", "/console/", "Overview"),
    ("parity", "/console/parity", "Parity"),
    ("ledger", "/console/ledger", "Ledger"),
    ("cutover", "/console/cutover", "Cutover"),
    ("orgs", "/console/orgs", "Orgs"),
    ("audit", "/console/audit", "Audit"),
]
CHART_RUNS = 720  # runs drawn on the parity chart: 30 days of hourly buckets
TABLE_ROWS = 200  # rows listed in a page's tables


def render(
    request: Request[Any, Any, Any], session: Session, page: str, code: int = 200, **context: Any
) -> Template:
    """The page's template with what every page shows: the navigation, who is signed in, and
    the session's CSRF token for its forms (never the bearer token)."""
    return Template(
        template_name=f"{page}.html",
        context={
            "nav": NAV,
            "page": page,
            "user": session.name,
            "scopes": sorted(session.scopes),
            "admin": session.admin,
            "csrf": session.csrf,
            **context,
        },
        status_code=code,
    )


def _short(value: Any, length: int = 300) -> str:
    """An audit record's before or after as JSON, cut to `length` characters."""
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= length else text[: length - 1] + "…"


def _units(micros: int | None) -> str:
    return "absent" if micros is None else format_micros(micros)


WORST_ORGS = 20


async def org_context(cp: ControlPlane, org: str | None) -> dict[str, Any]:
    """What the orgs page shows for `org`: the org, and the capability tokens issued for it
    (by digest: the audit trail never holds a token)."""
    org = (org or "").strip() or None
    found = await cp.org(org) if org else None
    issued = [
        {"at": e.at, "actor": e.actor, **e.after}
        for e in await cp.audit_entries("capability.issued", limit=TABLE_ROWS)
        if org and e.subject == org and isinstance(e.after, dict)
    ]
    return {
        "org": org,
        "found": found,
        "issued": issued,
        "capabilities": bool(cp.config.capabilities.keys),
    }


async def _window(cp: ControlPlane, start: str, end: str) -> dict[str, Any]:
    """The worst orgs of a parity comparison over [start, end), or the error that stopped it."""
    try:
        comparison = comparison_api(await cp.parity(parse_instant(start), parse_instant(end)))
    except ValueError as exc:  # a malformed time, or an unaligned window (InvalidInput)
        return {"error": str(exc)}
    except ControlPlaneError as exc:  # the legacy source failed
        return {"error": exc.message}

    def badness(org: dict[str, Any]) -> tuple[bool, bool, Decimal, Decimal]:
        rel, absolute = org["relative_drift"], Decimal(org["absolute_drift"] or 0)
        return (bool(org["within_tolerance"]), rel is not None, -Decimal(rel or 0), -absolute)

    return {
        "summary": comparison["summary"],
        "worst": sorted(comparison["orgs"], key=badness)[:WORST_ORGS],
    }


def _watching_since(state: State) -> float | None:
    jobs = state.get("jobs")
    started: float | None = None if jobs is None else jobs.started_at
    return started


async def cutover_context(cp: ControlPlane) -> dict[str, Any]:
    """What the cutover page shows besides an action's result."""
    status = await cp.cutover.status(limit=20)
    preview = await cp.hand_back.preview()
    return {
        "status": status,
        "flags": status.flags,
        "t": status.flags["legacy_bill_until"] or status.flags["flags"]["bill_from"]["value"],
        "to_cancel": [r.to_api() for r in preview.to_cancel],
        "to_cancel_count": preview.to_cancel_count,
        "to_offset": [r.to_api() for r in preview.to_offset],
        "to_offset_count": preview.to_offset_count,
        "credit_notes": [r.to_api() for r in preview.credit_notes],
        "credit_notes_count": preview.credit_notes_count,
        "cancel_window": cp.config.cutover.cancel_window_seconds,
        "bucket_seconds": cp.config.rollup.bucket_seconds,
        "now": cp.now(),
    }


class ConsolePages(Controller):
    """Every page needs a session with the `read` scope."""

    path = "/console"
    include_in_schema = False
    guards = [console_session]
    opt = {"scope": "read"}

    @get("/")
    async def overview(self, request: Request[Any, Any, Any], cp: CP, state: State) -> Template:
        session = current(request)
        status = await cp.cutover.status(limit=5)
        jobs = await job_health.statuses(cp, now=cp.clock(), watching_since=_watching_since(state))
        runs = await cp.parity_runs(limit=1)
        reconciled = await cp.reconciler.runs(limit=50)
        return render(
            request,
            session,
            "overview",
            status=status,
            flags=status.flags,
            jobs=[{"job": j.job, **j.to_api()} for j in jobs],
            last_run=runs[0] if runs else None,
            last_drift=charts.drift_percent(runs[0]) if runs else None,
            clean=await cp.parity_clean_since(),
            legacy=cp.legacy is not None,
            meter=cp.config.parity.meter,
            reconciles=cp.reconciles,
            reconciled=reconciled[0] if reconciled else None,
            reconciled_clean_since=reconcile_clean_since(reconciled),
        )

    @get("/parity")
    async def parity(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        run: FromQuery[int | None] = None,
        start: Annotated[str | None, QueryParameter(name="from")] = None,
        end: Annotated[str | None, QueryParameter(name="to")] = None,
    ) -> Template:
        session = current(request)
        bucket = cp.config.rollup.bucket_seconds
        settled = cp.now() - cp.now() % bucket
        window: dict[str, Any] = {
            "from": start or str(settled - 24 * 3600),
            "to": end or str(settled),
            "asked": start is not None or end is not None,
        }
        if window["asked"]:
            window.update(await _window(cp, window["from"], window["to"]))
        runs = await cp.parity_runs(limit=CHART_RUNS)
        chosen = run
        if chosen is None:  # the newest run that did not match
            chosen = next((r.id for r in runs if not r.clean), None)
        details = await cp.parity_run(chosen) if chosen is not None else None
        tolerance = cp.config.parity.tolerance * 100
        return render(
            request,
            session,
            "parity",
            chart=charts.drift_chart(runs, tolerance),
            points=charts.points(runs)[::-1][:TABLE_ROWS],
            runs_total=len(runs),
            chart_limit=CHART_RUNS,
            run=details[0] if details else None,
            mismatching=[
                {
                    "org_id": d.org_id,
                    "controlplane": _units(d.controlplane_micros),
                    "legacy": _units(d.legacy_micros),
                }
                for d in (details[1] if details else [])
            ],
            clean=await cp.parity_clean_since(),
            meter=cp.config.parity.meter,
            tolerance=tolerance.normalize(),
            legacy=cp.legacy is not None,
            window=window,
        )

    @get("/ledger")
    async def ledger(
        self,
        request: Request[Any, Any, Any],
        cp: CP,
        org: FromQuery[str | None] = None,
        meter: FromQuery[str | None] = None,
        bucket: FromQuery[int | None] = None,
    ) -> Template:
        session = current(request)
        org = (org or "").strip() or None
        counts = await cp.ledger_counts()
        held = await cp.ledger(state=RowState.HELD, limit=TABLE_ROWS)
        rows = await cp.ledger(org_id=org, limit=TABLE_ROWS) if org else []
        history: list[dict[str, Any]] = []
        if org and meter and bucket is not None:  # every revision of one bucket's row
            history = [
                r.to_api()
                for r in await cp.ledger(org_id=org, start=bucket, end=bucket + 1, limit=1000)
                if r.meter == meter
            ]
        return render(
            request,
            session,
            "ledger",
            counts=sorted(counts, key=lambda c: (c.state, c.reason or "")),
            held=[r.to_api() for r in held],
            org=org,
            rows=[r.to_api() for r in rows],
            limit=TABLE_ROWS,
            history=history,
            meter=meter,
            bucket=bucket,
        )

    @get("/cutover")
    async def cutover(self, request: Request[Any, Any, Any], cp: CP) -> Template:
        session = current(request)
        return render(request, session, "cutover", **await cutover_context(cp))

    @get("/orgs")
    async def orgs(
        self, request: Request[Any, Any, Any], cp: CP, org: FromQuery[str | None] = None
    ) -> Template:
        session = current(request)
        return render(request, session, "orgs", **await org_context(cp, org))

    @get("/audit")
    async def audit(
        self, request: Request[Any, Any, Any], cp: CP, verify: FromQuery[bool] = False
    ) -> Template:
        session = current(request)
        entries = await cp.audit_entries("", limit=TABLE_ROWS)
        verified: dict[str, Any] | None = None
        if verify:
            checked, broken = await cp.verify_audit()
            verified = {
                "checked": checked,
                "broken_id": broken.id if broken else None,
                "reason": broken.reason if broken else None,
            }
        return render(
            request,
            session,
            "audit",
            entries=[
                {
                    **msgspec.structs.asdict(e),
                    "before": _short(e.before),
                    "after": _short(e.after),
                }
                for e in entries
            ],
            verified=verified,
        )
