"""`POST /v1/events`: usage events in, all or nothing."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Controller, Request, post
from litestar.exceptions import HTTPException

from controlplane.events import DEFAULT_SOURCE, BatchTooLarge, decode_body
from controlplane.http.guards import BEARER, actor, require_scope
from controlplane.http.middleware import declared_length, decoded
from controlplane.http.openapi import IngestOperation
from controlplane.http.params import CP
from controlplane.http.problems import AUTH, documented
from controlplane.interfaces import IngestResult
from controlplane.ratelimit import IngestLimiter, RateLimited

log = structlog.get_logger("api")


class EventsController(Controller):
    """Ingest, behind a token with the `ingest` scope. The app mounts it on a router that
    allows bodies up to `server.max_body_bytes` (every other body is small)."""

    path = "/v1/events"
    tags = ["events"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "ingest"}

    @post(
        status_code=200,
        summary="Ingest usage events",
        responses=documented(*AUTH, 400, 413, 415, 422, 429),
        operation_class=IngestOperation,
    )
    async def ingest_events(self, request: Request[Any, Any, Any], cp: CP) -> IngestResult:
        """Accepts a JSON object, a JSON array, NDJSON or a CloudEvents batch. All or nothing;
        answers after commit with the accepted and duplicate counts."""
        token = actor(request)
        limiter: IngestLimiter = request.app.state.limiter
        try:
            limiter.admit(token)
        except RateLimited as exc:
            cp.metrics.refused("rate_limited")
            log.warning("ratelimit.refused", token=token, retry_after=exc.retry_after_header)
            raise
        limit = cp.config.server.max_body_bytes
        declared = declared_length(request.headers.get("content-length"))
        if declared is not None and declared > limit:
            cp.metrics.refused("too_large")
            raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
        try:
            body = await request.body()  # the router's limit: max_body_bytes, also when streamed
        except HTTPException as exc:
            if exc.status_code == 413:
                cp.metrics.refused("too_large")
            raise
        body = decoded(body, request.headers.get("content-encoding", ""), limit)
        try:
            items = decode_body(
                body,
                request.headers.get("content-type", "application/json"),
                cp.config.server.max_batch_events,
            )
        except BatchTooLarge as exc:
            cp.metrics.refused("too_large")
            raise HTTPException(status_code=413, detail=exc.message) from None
        limiter.charge(token, len(items))
        return await cp.ingest(items, DEFAULT_SOURCE)
