"""The client's lookup stream when the service goes away: prompt UNAVAILABLE, reconnect after a
restart (waits resent, instances registered again by `keep_registered`)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pdmesh.errors import NotFound, Unavailable
from pdmesh.server.client import BootstrapClient, close_shared_clients, shared_client
from pdmesh.server.config import BootstrapConfig
from pdmesh.server.demo import instance_info
from pdmesh.server.service import create_bootstrap_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def start(port: int):
    _, _, service = create_bootstrap_server(f"127.0.0.1:{port}", BootstrapConfig(port=port))
    await service.start()
    return service


def test_unreachable_service_fails_waiters_promptly_not_at_their_deadline():
    async def main():
        async with BootstrapClient(f"127.0.0.1:{free_port()}", connect_timeout_s=0.5) as client:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(client.wait_for_room(r, timeout=30) for r in (11, 12, 13)),
                                           client.lookup_rooms([14], timeout=30), return_exceptions=True)
            assert all(isinstance(r, Unavailable) for r in results), results
            assert results[0].reason == "BOOTSTRAP_UNREACHABLE"
            assert time.perf_counter() - t0 < 3.0
    asyncio.run(main())


def test_stream_reconnects_after_a_restart_and_instances_register_again():
    port = free_port()
    address = f"127.0.0.1:{port}"
    info = instance_info("prefill-r", epoch=5, dp_size=4)

    async def main():
        first = await start(port)
        decode = shared_client(address)
        assert shared_client(address) is decode  # one client (channel, stream) per address
        async with BootstrapClient(address) as prefill:
            keeper = asyncio.ensure_future(prefill.keep_registered(info, interval_s=0.05))
            await wait_until(lambda: first.registry.stats()["instances"] == 1)
            waiting = asyncio.ensure_future(decode.wait_for_room(555, timeout=20))
            await wait_until(lambda: first.registry.stats()["waiters"] == 1)
            await first.stop(0)  # the service restarts: its registry is gone
            second = await start(port)
            try:
                # keep_registered notices (heartbeat NOT_FOUND) and registers the instance again;
                # the decode's stream reconnects and asks for room 555 again.
                await wait_until(lambda: second.registry.stats()["instances"] == 1)
                await wait_until(lambda: second.registry.stats()["waiters"] == 1)
                assert second.servicer.open_streams == 1
                assert not waiting.done()
                await prefill.register_room("prefill-r", 555, 3)
                assert await asyncio.wait_for(waiting, 5) == 3
                with pytest.raises(NotFound):
                    await prefill.lookup_room(556)
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                await close_shared_clients()
                await second.stop(0)
    asyncio.run(main())


def test_waiters_fail_unavailable_when_the_service_dies_for_good():
    port = free_port()

    async def main():
        service = await start(port)
        async with BootstrapClient(f"127.0.0.1:{port}", connect_timeout_s=0.5) as client:
            waiting = asyncio.ensure_future(client.wait_for_room(99, timeout=30))
            await wait_until(lambda: service.registry.stats()["waiters"] == 1)
            t0 = time.perf_counter()
            await service.stop(0)
            with pytest.raises(Unavailable):
                await waiting
            assert time.perf_counter() - t0 < 3.0
    asyncio.run(main())
