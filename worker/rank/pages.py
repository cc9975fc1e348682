"""A rank's page broker: waits (bounded) for free pages instead of failing at once.

Wraps the rank's `KvPool`: `alloc_wait(n, timeout)` takes n pages as soon as they are free, or
raises RESOURCE_EXHAUSTED at the timeout (never more than the pool holds, never another request's
pages); every free goes through `free` so waiters wake. Also runs engine calls on the rank's one
engine thread, and waits for a cancelled call's thread to let go of its pages before they return.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from pdmesh.errors import ResourceExhausted
from pdmesh.reasons import Reason
from pdmesh.worker.engine.runtime import apply_torch_threads
from pdmesh.worker.kv.pool import KvPool


class PageBroker:
    def __init__(self, pool: KvPool) -> None:
        self.pool = pool
        self.layout = pool.layout
        self.num_pages = pool.num_pages
        self._freed = asyncio.Condition()

    @property
    def kv(self):
        return self.pool.kv

    def alloc(self, n: int) -> list[int]:
        return self.pool.alloc(n)

    def free(self, ids: list[int]) -> None:
        if not ids:
            return
        self.pool.free(ids)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    async def alloc_wait(self, n: int, timeout_s: float) -> list[int]:
        if n > self.pool.num_pages:
            raise ResourceExhausted(
                f"the request needs {n} KV pages but the whole pool has {self.pool.num_pages}",
                reason=Reason.REQUEST_LARGER_THAN_POOL, metadata={"pages": n, "num_pages": self.pool.num_pages})
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: self.pool.num_free >= n), timeout_s)
            except asyncio.TimeoutError:
                raise ResourceExhausted(
                    f"no {n} free KV pages within {timeout_s:.1f}s ({self.pool.num_free} free of "
                    f"{self.pool.num_pages}); retry later", reason=Reason.KV_POOL_EXHAUSTED, retry_after_s=0.5,
                    metadata={"pages": n, "free_pages": self.pool.num_free}) from None
            return self.pool.alloc(n)


class EngineThread:
    """The rank's single engine thread (engines are not thread-safe)."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine",
                                           initializer=apply_torch_threads)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread. If the caller is cancelled, wait until the thread
        has finished with its arguments (the pages it writes) before the cancellation propagates."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
