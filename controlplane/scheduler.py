"""The jobs `serve` runs on a schedule: rollup, send and (with a legacy source) the parity
checker, each pass recorded; and the watcher that alerts when one of them fails or stalls
(see :mod:`controlplane.health`)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from controlplane import health
from controlplane.core import ControlPlane

log = structlog.get_logger("scheduler")


class Jobs:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.started_at: float | None = None  # when this process began running the jobs
        common: dict[str, Any] = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        runs = {
            "rollup": self.rollup,
            "send": self.send,
            "parity": self.parity,
            "reconcile": self.reconcile,
        }
        # One list of jobs and intervals, which the health checks judge them by.
        jobs = health.scheduled_jobs(
            cp.config, legacy=cp.legacy is not None, reconcile=cp.reconciles
        )
        for job, every in jobs.items():
            self.scheduler.add_job(runs[job], "interval", seconds=every, id=job, **common)
        watch = cp.config.jobs.watch_interval_seconds
        self.scheduler.add_job(self.watch, "interval", seconds=watch, id="watch", **common)

    # A failed pass is recorded and logged by record(); the next run tries again.

    async def rollup(self) -> None:
        with contextlib.suppress(Exception):
            await self.cp.record("rollup", functools.partial(self.cp.rollup, wait=False))

    async def send(self) -> None:
        with contextlib.suppress(Exception):
            await self.cp.record("send", self.cp.send)

    async def parity(self) -> None:
        with contextlib.suppress(Exception):
            await self.cp.record("parity", self.cp.parity_check)

    async def reconcile(self) -> None:
        with contextlib.suppress(Exception):
            await self.cp.record("reconcile", self.cp.reconciler.scheduled)

    async def watch(self) -> None:
        """Alert on failing or stale jobs; not itself recorded as a job run."""
        try:
            await health.watch(self.cp, watching_since=self.started_at)
        except Exception as exc:
            log.error("jobs.watch_failed", error=str(exc))

    def start(self) -> None:
        self.started_at = self.cp.clock()
        self.scheduler.start()
        log.info("scheduler.started", jobs=[j.id for j in self.scheduler.get_jobs()])

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
