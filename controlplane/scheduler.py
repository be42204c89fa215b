"""The jobs `serve` runs on a schedule: rollup, send and (with a legacy source) the parity
checker, each pass recorded."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from controlplane.core import ControlPlane

log = structlog.get_logger("scheduler")


class Jobs:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        rollup = cp.config.rollup.interval_seconds
        send = cp.config.sender.interval_seconds
        common: dict[str, Any] = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        self.scheduler.add_job(self.rollup, "interval", seconds=rollup, id="rollup", **common)
        self.scheduler.add_job(self.send, "interval", seconds=send, id="send", **common)
        if cp.legacy is not None:
            every = cp.config.parity.interval_seconds
            self.scheduler.add_job(self.parity, "interval", seconds=every, id="parity", **common)

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

    def start(self) -> None:
        self.scheduler.start()
        log.info("scheduler.started", jobs=[j.id for j in self.scheduler.get_jobs()])

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
