"""Admission control: a bounded number of requests in flight per instance, a bounded queue.

A request that finds its instance full waits in the queue if the queue has room, up to
`queue_timeout_s`; otherwise it is refused at once with RESOURCE_EXHAUSTED and a RetryInfo. Nothing
grows without bound.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from pdmesh.errors import ResourceExhausted
from pdmesh.reasons import Reason


class Admission:
    """In-flight limit and bounded wait queue for one instance."""

    def __init__(self, name: str, max_in_flight: int, max_queued: int, queue_timeout_s: float) -> None:
        self.name = name
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self.queued = 0
        self._freed = asyncio.Condition()

    def _refuse(self, why: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"{self.name} is at capacity ({why}); retry after the suggested delay",
            reason=Reason.ROUTER_AT_CAPACITY, retry_after_s=0.1,
            metadata={"instance": self.name, "in_flight": self.in_flight, "queued": self.queued})

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one in-flight slot for the body of the `async with`."""
        if self.in_flight >= self.max_in_flight:
            if self.queued >= self.max_queued:
                raise self._refuse(f"{self.in_flight} in flight, queue of {self.max_queued} full")
            self.queued += 1
            try:
                async with self._freed:
                    await asyncio.wait_for(
                        self._freed.wait_for(lambda: self.in_flight < self.max_in_flight),
                        self.queue_timeout_s)
            except asyncio.TimeoutError:
                raise self._refuse(f"queued {self.queue_timeout_s:.1f}s without a free slot") from None
            finally:
                self.queued -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            async with self._freed:
                self._freed.notify(1)
