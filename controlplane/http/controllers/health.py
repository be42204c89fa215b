"""Liveness, readiness and Prometheus metrics: open, for probes and scrapers (metrics can be
put behind a token with `server.metrics_require_token`)."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from controlplane import health as job_health
from controlplane import scrape
from controlplane.core import ControlPlane
from controlplane.errors import ControlPlaneError
from controlplane.http.guards import metrics_auth
from controlplane.http.params import CP
from controlplane.http.problems import documented

log = structlog.get_logger("api")


class Liveness(msgspec.Struct):
    status: str  # "ok"


class Readiness(msgspec.Struct):
    status: str  # "ready" or "not ready"
    checks: dict[str, Any]


def _watching_since(state: State) -> float | None:
    """When this process began running the scheduled jobs (None: it does not run them)."""
    jobs = state.get("jobs")
    started: float | None = None if jobs is None else jobs.started_at
    return started


class HealthController(Controller):
    path = "/"
    tags = ["health"]

    @get("/healthz", summary="Liveness")
    async def healthz(self) -> Liveness:
        return Liveness("ok")

    @get(
        "/readyz",
        summary="Readiness: storage reachable, migrations current, jobs not stale",
        responses={
            503: ResponseSpec(
                data_container=Readiness, description="Not ready", generate_examples=False
            )
        },
    )
    async def readyz(self, cp: CP, state: State) -> Response[Readiness]:
        """503 when not ready. A process that runs the scheduled jobs is also not ready while
        one of them has not succeeded within `jobs.stale_after_intervals` of its interval."""
        ready = await readiness(cp, state)
        return Response(ready, status_code=200 if ready.status == "ready" else 503)


async def readiness(cp: ControlPlane, state: State) -> Readiness:
    """Storage reachable and migrated; in a process that runs the jobs, none of them stale;
    and (informational) whether each stream ingest source can consume."""
    checks: dict[str, Any] = {}
    ok = True
    try:
        status = await cp.storage_status()
        checks["storage"] = "ok"
        checks["migrations"] = "ok" if status.current else f"pending: {status.pending}"
        ok = status.current
        if state.get("jobs") is not None:
            jobs = await job_health.statuses(
                cp, now=cp.clock(), watching_since=_watching_since(state)
            )
            checks["jobs"] = {j.job: j.to_api() for j in jobs}
            stale = [j for j in jobs if j.stale]
            for job in stale:
                log.warning("jobs.stale", job=job.job, stale_since=job.stale_since)
            ok = ok and not stale
        if cp.ingest_sources:
            # informational: HTTP ingest still works while a stream source cannot consume,
            # and the stream keeps its backlog until it can
            checks["ingest"] = {s.label: s.failing() or "ok" for s in cp.ingest_sources}
    except ControlPlaneError as exc:
        checks["storage"] = f"failed: {exc}"
        ok = False
    return Readiness("ready" if ok else "not ready", checks)


class MetricsController(Controller):
    path = "/metrics"
    tags = ["health"]
    guards = [metrics_auth]

    @get(
        media_type=scrape.CONTENT_TYPE,
        summary="Prometheus metrics (text exposition format)",
        responses=documented(401, 403),  # only with server.metrics_require_token
    )
    async def prometheus_metrics(self, cp: CP, state: State) -> Response[bytes]:
        body = await scrape.exposition(cp, watching_since=_watching_since(state))
        return Response(body, media_type=scrape.CONTENT_TYPE)
