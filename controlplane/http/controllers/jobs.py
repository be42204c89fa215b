"""`GET /v1/jobs`: the recorded passes of the scheduled jobs."""

from __future__ import annotations

import msgspec
from litestar import Controller, get
from litestar.params import FromQuery

from controlplane.http.guards import BEARER, require_scope
from controlplane.http.params import CP, Limit
from controlplane.http.problems import AUTH, documented
from controlplane.interfaces import JobRun


class JobRuns(msgspec.Struct):
    runs: list[JobRun]  # newest first


class JobsController(Controller):
    path = "/v1/jobs"
    tags = ["jobs"]
    security = BEARER
    guards = [require_scope]
    opt = {"scope": "read"}

    @get(summary="Recent job runs, newest first", responses=documented(*AUTH, 400))
    async def job_runs(
        self, cp: CP, job: FromQuery[str | None] = None, limit: Limit = 50
    ) -> JobRuns:
        return JobRuns(await cp.job_runs(job, limit))
