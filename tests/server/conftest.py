"""Fixtures of the bootstrap-service tests: instance infos, and a real server at port 0 that runs on
its own thread and event loop (as another process would), shared by a module's tests."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable

import pytest

from pdmesh.bootstrap.v1 import bootstrap_pb2
from pdmesh.common.v1 import common_pb2
from pdmesh.server.config import BootstrapConfig
from pdmesh.server.demo import instance_info
from pdmesh.server.service import create_bootstrap_server

RR = common_pb2.LOAD_BALANCE_METHOD_ROUND_ROBIN
FOLLOW = common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM


def make_info(instance_id: str = "prefill-a", *, epoch: int = 1, **kw) -> bootstrap_pb2.InstanceInfo:
    return instance_info(instance_id, epoch=epoch, **kw)


class ThreadedBootstrap:
    """A bootstrap server on a private thread and loop; `address`, `registry`, `call(fn)`."""

    def __init__(self, config: BootstrapConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        _, self.port, self.service = self.run(self._create(config))
        self.address = f"127.0.0.1:{self.port}"
        self.registry = self.service.registry

    async def _create(self, config: BootstrapConfig):
        created = create_bootstrap_server("127.0.0.1:0", config)
        await created.service.start()
        return created

    def run(self, coro: Awaitable) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the server's loop (the registry is driven by that loop only)."""
        async def wrapper():
            return fn()
        return self.run(wrapper())

    def stop(self) -> None:
        self.run(self.service.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def info_factory():
    """`make_info(instance_id, epoch=1, dp_size=2, method=RR, force_query=False, **fields)`."""
    return make_info


@pytest.fixture(scope="module")
def bootstrap():
    server = ThreadedBootstrap(BootstrapConfig(port=0, max_waiters=5000, default_wait_s=5.0))
    yield server
    server.stop()
