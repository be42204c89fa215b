"""structlog setup: JSON (or console) lines with stable event names and key-value context."""

from __future__ import annotations

import logging
import sys

import structlog

from controlplane.config import LoggingConfig

# Libraries that log every scheduled run or HTTP call at INFO: the product's own events
# (`sender.done`, `rollup.done`, ...) say what matters; theirs show from WARNING on.
CHATTY = ("apscheduler", "httpx", "stripe")


class _Stderr:
    """Whatever `sys.stderr` is when a line is written (it may be replaced after setup)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(config: LoggingConfig) -> None:
    level = getattr(logging, config.level.upper())
    for name in CHATTY:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if config.format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
