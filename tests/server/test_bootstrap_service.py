"""Servicer tests on a real bootstrap server at port 0: status codes, decoded ErrorInfo reasons,
long polls, the shared lookup stream, and the client's typed errors."""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.errors import (AlreadyExists, DeadlineExceeded, InvalidArgument, NotFound, PdmeshError,
                           ResourceExhausted)
from pdmesh.grpcutil import BindError
from pdmesh.reasons import Reason
from pdmesh.rules import MAX_ROOM
from pdmesh.server.client import BootstrapClient
from pdmesh.server.config import BootstrapConfig
from pdmesh.server.service import SERVICE_NAME, create_bootstrap_server

_ids = itertools.count(1)


def fresh_id() -> str:
    return f"prefill-{next(_ids)}"


async def raw_error(call) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo]:
    """Await a raw stub call that must fail; return its code and decoded ErrorInfo."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        status = rpc_status.from_call(err)
        assert status is not None, "no rich status"
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert info.domain == "pdmesh"
        return err.code(), info
    raise AssertionError("the call succeeded")


async def wait_until(predicate, timeout: float = 5.0) -> None:
    """Poll a condition of the server's state (no event to await across the process boundary)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def test_health_serving(bootstrap):
    async def main():
        async with grpc.aio.insecure_channel(bootstrap.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    asyncio.run(main())


def test_bad_input_is_invalid_argument_with_reason_and_changes_nothing(bootstrap, info_factory):
    iid = fresh_id()
    bad_instances = [(info_factory(""), "INVALID_INSTANCE_ID"),
                     (info_factory(iid, dp_size=5000), "INVALID_DP_SIZE"),
                     (info_factory(iid, tp_size=0), "INVALID_INSTANCE_INFO"),
                     (info_factory(iid, epoch=0), "INVALID_INSTANCE_INFO")]

    async def main():
        async with grpc.aio.insecure_channel(bootstrap.address) as channel:
            stub = bootstrap_pb2_grpc.BootstrapServiceStub(channel)
            before = bootstrap.call(bootstrap.registry.stats)
            for info, reason in bad_instances:
                code, detail = await raw_error(stub.RegisterInstance(
                    bootstrap_pb2.RegisterInstanceRequest(info=info), timeout=5))
                assert (code, detail.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
            await stub.RegisterInstance(bootstrap_pb2.RegisterInstanceRequest(info=info_factory(iid)), timeout=5)
            rooms = [
                (bootstrap_pb2.RegisterRoomRequest(instance_id=iid, bootstrap_room=0, dp_rank=0),
                 "INVALID_BOOTSTRAP_ROOM"),
                (bootstrap_pb2.RegisterRoomRequest(instance_id=iid, bootstrap_room=1 << 63, dp_rank=0),
                 "INVALID_BOOTSTRAP_ROOM"),
                (bootstrap_pb2.RegisterRoomRequest(instance_id=iid, bootstrap_room=5, dp_rank=2),
                 "DP_RANK_OUT_OF_RANGE"),
                (bootstrap_pb2.RegisterRoomRequest(instance_id=iid, bootstrap_room=5), "DP_RANK_MISSING"),
                (bootstrap_pb2.RegisterRoomRequest(instance_id="", bootstrap_room=5, dp_rank=0),
                 "INVALID_INSTANCE_ID"),
            ]
            for request, reason in rooms:
                code, detail = await raw_error(stub.RegisterRoom(request, timeout=5))
                assert (code, detail.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
            code, detail = await raw_error(stub.LookupRoom(
                bootstrap_pb2.LookupRoomRequest(bootstrap_room=(1 << 64) - 1), timeout=5))
            assert (code, detail.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BOOTSTRAP_ROOM")
            assert detail.metadata["bootstrap_room"] == str((1 << 64) - 1)
            after = bootstrap.call(bootstrap.registry.stats)
            assert after["rooms"] == before["rooms"]
            assert after["instances"] == before["instances"] + 1  # only the valid one
    asyncio.run(main())


def test_register_lookup_conflict_not_found_remove(bootstrap, info_factory):
    iid = fresh_id()

    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            await client.register_instance(info_factory(iid, dp_size=4))
            assert await client.register_room(iid, MAX_ROOM, 0, "req-1") is True
            assert await client.register_room(iid, MAX_ROOM, 0, "req-1") is False
            found = await client.lookup_room(MAX_ROOM)
            assert (found.dp_rank, found.HasField("dp_rank"), found.instance_id, found.epoch) == (0, True, iid, 1)
            with pytest.raises(AlreadyExists) as exc:
                await client.register_room(iid, MAX_ROOM, 3, "req-1")
            assert exc.value.reason == "ROOM_ALREADY_REGISTERED"
            with pytest.raises(NotFound) as exc:
                await client.lookup_room(MAX_ROOM - 1)
            assert exc.value.reason == "ROOM_NOT_FOUND"
            with pytest.raises(NotFound) as exc:
                await client.register_room("no-such-prefill", 5, 0)
            assert exc.value.reason == "INSTANCE_NOT_FOUND"
            await client.remove_room(MAX_ROOM)
            with pytest.raises(NotFound):
                await client.remove_room(MAX_ROOM)
            async with grpc.aio.insecure_channel(bootstrap.address) as channel:
                stub = bootstrap_pb2_grpc.BootstrapServiceStub(channel)
                code, detail = await raw_error(stub.LookupRoom(
                    bootstrap_pb2.LookupRoomRequest(bootstrap_room=MAX_ROOM), timeout=5))
                assert (code, detail.reason) == (grpc.StatusCode.NOT_FOUND, "ROOM_NOT_FOUND")
    asyncio.run(main())


def test_instances(bootstrap, info_factory):
    iid = fresh_id()

    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            info = info_factory(iid, dp_size=3, force_query=True)
            response = await client.register_instance(info)
            assert response.created and response.heartbeat_interval_ms > 0
            assert (await client.register_instance(info)).created is False
            assert await client.get_instance(iid) == info
            assert iid in [i.instance_id for i in await client.list_instances()]
            await client.heartbeat_instance(iid, 1)
            with pytest.raises(AlreadyExists) as exc:
                await client.register_instance(info_factory(iid, dp_size=2))
            assert exc.value.reason == "INSTANCE_EPOCH_CONFLICT"
            await client.deregister_instance(iid)
            with pytest.raises(NotFound) as exc:
                await client.heartbeat_instance(iid, 1)
            assert exc.value.reason == "INSTANCE_NOT_FOUND"
    asyncio.run(main())


def test_unary_long_poll_answers_when_the_room_registers(bootstrap, info_factory):
    iid = fresh_id()
    waiters = lambda: bootstrap.call(bootstrap.registry.stats)["waiters"]  # noqa: E731

    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            await client.register_instance(info_factory(iid, dp_size=2))
            base = waiters()
            waiting = asyncio.ensure_future(client.lookup_room(4242, wait=True, timeout=5))
            await wait_until(lambda: waiters() == base + 1)
            t0 = time.perf_counter()
            await client.register_room(iid, 4242, 1)
            assert (await waiting).dp_rank == 1
            assert time.perf_counter() - t0 < 1.0
            t0 = time.perf_counter()
            with pytest.raises(DeadlineExceeded) as exc:
                await client.lookup_room(4343, wait=True, timeout=0.2)
            assert exc.value.reason == "ROOM_WAIT_TIMEOUT"
            assert 0.15 < time.perf_counter() - t0 < 1.5
            assert waiters() == base
    asyncio.run(main())


def test_one_stream_serves_every_waiter(bootstrap, info_factory):
    iid = fresh_id()
    rooms = list(range(10_001, 10_101))

    async def main():
        async with BootstrapClient(bootstrap.address) as decode, BootstrapClient(bootstrap.address) as prefill:
            await prefill.register_instance(info_factory(iid, dp_size=4))
            tasks = [asyncio.ensure_future(decode.wait_for_room(room, timeout=10))
                     for room in rooms for _ in range(2)]
            await wait_until(lambda: bootstrap.call(bootstrap.registry.stats)["waiters"] >= len(rooms))
            assert bootstrap.call(lambda: bootstrap.service.servicer.open_streams) == 1
            for room in rooms:
                await prefill.register_room(iid, room, room % 4)
            got = await asyncio.gather(*tasks)
            assert got == [room % 4 for room in rooms for _ in range(2)]
            lookups = await decode.lookup_rooms([rooms[0], rooms[1], 999_999])
            assert lookups == {rooms[0]: rooms[0] % 4, rooms[1]: rooms[1] % 4, 999_999: None}
            assert bootstrap.call(lambda: bootstrap.service.servicer.open_streams) == 1
    asyncio.run(main())


def test_stream_wait_times_out_and_the_server_stops_waiting(bootstrap):
    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            await client.ping()
            base = bootstrap.call(bootstrap.registry.stats)["waiters"]
            t0 = time.perf_counter()
            with pytest.raises(DeadlineExceeded) as exc:
                await client.wait_for_room(777_777, timeout=0.2)
            assert exc.value.reason == "ROOM_WAIT_TIMEOUT"
            assert 0.15 < time.perf_counter() - t0 < 1.5
            await wait_until(lambda: bootstrap.call(bootstrap.registry.stats)["waiters"] == base)
            with pytest.raises(InvalidArgument):
                await client.wait_for_room(0, timeout=1)
            with pytest.raises(InvalidArgument):
                await client.lookup_rooms([5, 1 << 63])
    asyncio.run(main())


def test_raw_stream_reports_invalid_rooms_per_room(bootstrap):
    async def main():
        async with grpc.aio.insecure_channel(bootstrap.address) as channel:
            call = bootstrap_pb2_grpc.BootstrapServiceStub(channel).WatchRooms()
            await call.write(bootstrap_pb2.WatchRoomsRequest(tag=9, bootstrap_rooms=[0, 31337],
                                                             wait_bootstrap_rooms=[1 << 63]))
            reply = await call.read()
            assert reply.tag == 9 and list(reply.missing_bootstrap_rooms) == [31337]
            errors = {e.bootstrap_room: PdmeshError.from_status_proto(e.status) for e in reply.errors}
            assert sorted(errors) == [0, 1 << 63]
            for room, err in errors.items():  # a google.rpc.Status with its ErrorInfo, as a call's
                assert isinstance(err, InvalidArgument) and err.reason == Reason.INVALID_BOOTSTRAP_ROOM
                assert err.metadata["bootstrap_room"] == str(room)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
    asyncio.run(main())


def test_too_many_waiters_is_resource_exhausted_per_room():
    async def main():
        config = BootstrapConfig(port=0, max_waiters=2)
        _, port, service = create_bootstrap_server("127.0.0.1:0", config)
        await service.start()
        try:
            async with BootstrapClient(f"127.0.0.1:{port}") as client:
                held = [asyncio.ensure_future(client.wait_for_room(r, timeout=5)) for r in (1, 2)]
                await wait_until(lambda: service.registry.stats()["waiters"] == 2)
                with pytest.raises(ResourceExhausted) as exc:
                    await client.wait_for_room(3, timeout=5)
                assert exc.value.reason == "TOO_MANY_WAITERS"
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
                await wait_until(lambda: service.registry.stats()["waiters"] == 0)
        finally:
            await service.stop(0)
    asyncio.run(main())


def test_port_already_served_fails_at_once(bootstrap):
    async def main():
        with pytest.raises(BindError):
            create_bootstrap_server(bootstrap.address, BootstrapConfig())
    asyncio.run(main())


def test_raw_stream_reasked_wait_gets_the_new_timeout_and_untagged_answers(bootstrap, info_factory):
    iid = fresh_id()

    async def main():
        async with grpc.aio.insecure_channel(bootstrap.address) as channel:
            stub = bootstrap_pb2_grpc.BootstrapServiceStub(channel)
            await stub.RegisterInstance(bootstrap_pb2.RegisterInstanceRequest(info=info_factory(iid)), timeout=5)
            await stub.RegisterRoom(bootstrap_pb2.RegisterRoomRequest(
                instance_id=iid, bootstrap_room=61, dp_rank=1), timeout=5)
            call = stub.WatchRooms()
            # Untagged: room 61 is answered in an untagged response; room 62 waits 0.1 s ...
            await call.write(bootstrap_pb2.WatchRoomsRequest(wait_bootstrap_rooms=[61, 62, 62],
                                                             wait_timeout_ms=100))
            first = await call.read()
            assert (first.tag, list(first.bootstrap_rooms), list(first.dp_ranks)) == (0, [61], [1])
            # ... but is asked again with 10 s before that runs out, so it must not expire.
            await call.write(bootstrap_pb2.WatchRoomsRequest(tag=2, wait_bootstrap_rooms=[62],
                                                             wait_timeout_ms=10_000))
            assert (await call.read()).tag == 2
            await asyncio.sleep(0.3)
            await stub.RegisterRoom(bootstrap_pb2.RegisterRoomRequest(
                instance_id=iid, bootstrap_room=62, dp_rank=0), timeout=5)
            late = await asyncio.wait_for(call.read(), 5)
            assert (list(late.bootstrap_rooms), list(late.dp_ranks), list(late.expired_bootstrap_rooms)) == \
                ([62], [0], [])
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
    asyncio.run(main())
