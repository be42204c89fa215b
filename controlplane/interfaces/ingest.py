"""The ingest source contract: a plugin that pulls events into the pipeline."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

from controlplane.interfaces.records import IngestResult

EventSink = Callable[[Sequence[Any], str], Awaitable[IngestResult]]
"""Hands a batch of raw event objects (and the default `source`) to the pipeline."""


class IngestSource(abc.ABC):
    """A source that pulls events from somewhere (a stream, a file) into the pipeline."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self, sink: EventSink) -> None:
        """Begin consuming; every batch goes through `sink`, which validates and stores it."""

    @property
    def label(self) -> str:
        """Names this source in /readyz and /metrics (e.g. its stream)."""
        return self.name

    def failing(self) -> str | None:
        """None while the source consumes normally; else since when, and why, it cannot."""
        return None

    @property
    def dead_lettered(self) -> int:
        """Entries this source set aside as invalid (a dead-letter stream) since it started."""
        return 0

    @abc.abstractmethod
    async def close(self) -> None: ...
