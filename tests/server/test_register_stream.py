"""The registration stream (RegisterRoomsStream) on a real bootstrap server at port 0: rooms
registered over it are seen by lookups, rooms removed over it are gone, retries are idempotent, bad registrations fail typed one by
one while the stream goes on, registrations made together share a message, and the client's
stream survives a restart of the service."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time

import grpc
import pytest
from google.rpc import error_details_pb2

from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.common.v1 import common_pb2
from pdmesh.errors import AlreadyExists, FollowBootstrapRoomConflict, InvalidArgument, NotFound, PdmeshError, \
    Unavailable
from pdmesh.rules import MAX_ROOM
from pdmesh.server.client import BootstrapClient
from pdmesh.server.config import BootstrapConfig
from pdmesh.server.demo import instance_info
from pdmesh.server.service import create_bootstrap_server


_ids = itertools.count(1)


def fresh_id() -> str:
    return f"prefill-stream-{next(_ids)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode(result: bootstrap_pb2.RoomRegistrationResult) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo]:
    code = next(c for c in grpc.StatusCode if c.value[0] == result.status.code)
    info = error_details_pb2.ErrorInfo()
    assert result.status.details[0].Unpack(info)
    assert info.domain == "pdmesh"
    return code, info


def test_streamed_registrations_are_looked_up_and_share_messages(bootstrap, info_factory):
    iid = fresh_id()
    rooms = list(range(10_001, 10_065))

    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            await client.register_instance(info_factory(iid, dp_size=4))
            created = await asyncio.gather(*(client.register_room_streamed(iid, r, r % 4, f"req-{r}")
                                             for r in rooms))
            assert created == [True] * len(rooms)
            # 64 registrations made together: a handshake and a few messages, not 64 of them
            assert next(client._registrar._tags) <= 8
            assert await client.lookup_rooms(rooms, timeout=5) == {r: r % 4 for r in rooms}
            found = await client.lookup_room(rooms[0])
            assert (found.dp_rank, found.instance_id) == (rooms[0] % 4, iid)
            assert bootstrap.call(lambda: bootstrap.service.servicer.open_streams) == 1  # the lookups'
    asyncio.run(main())


def test_rooms_removed_over_the_stream_ride_on_its_messages(bootstrap, info_factory):
    iid = fresh_id()
    rooms = list(range(40_001, 40_009))

    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            await client.register_instance(info_factory(iid, dp_size=4))
            await asyncio.gather(*(client.register_room_streamed(iid, r, r % 4, f"req-{r}") for r in rooms))
            tags_before = next(client._registrar._tags)
            for room in rooms[:4]:
                client.remove_room_streamed(room)
            client.remove_room_streamed(49_999)  # never registered: skipped, the stream goes on
            # messages are served in order: once the next registration is answered, the removals are done
            assert await client.register_room_streamed(iid, 40_100, 0, "req-next") is True
            assert next(client._registrar._tags) - tags_before <= 3  # unanswered, not one call each
            assert await client.lookup_rooms(rooms, timeout=5) == {
                r: (None if r in rooms[:4] else r % 4) for r in rooms}
    asyncio.run(main())


def test_a_retried_registration_is_idempotent_and_conflicts_are_typed(bootstrap, info_factory):
    iid = fresh_id()

    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            await client.register_instance(info_factory(iid, dp_size=4))
            assert await client.register_room_streamed(iid, MAX_ROOM, 2, "req-1") is True
            assert await client.register_room_streamed(iid, MAX_ROOM, 2, "req-1") is False  # retry
            assert await client.register_room(iid, MAX_ROOM, 2, "req-1") is False  # unary agrees
            with pytest.raises(AlreadyExists) as exc:
                await client.register_room_streamed(iid, MAX_ROOM, 2, "req-2")  # another request
            assert exc.value.reason == "ROOM_ALREADY_REGISTERED"
            with pytest.raises(InvalidArgument) as exc:
                await client.register_room_streamed(iid, 0, 0, "req-3")
            assert exc.value.reason == "INVALID_BOOTSTRAP_ROOM"
            with pytest.raises(NotFound) as exc:
                await client.register_room_streamed("no-such-prefill", 5, 0)
            assert exc.value.reason == "INSTANCE_NOT_FOUND"
            assert await client.register_room_streamed(iid, MAX_ROOM - 1, 1) is True  # still works
    asyncio.run(main())


def test_bad_registrations_fail_alone_and_the_stream_goes_on(bootstrap, info_factory):
    iid, follow = fresh_id(), fresh_id()
    reg = bootstrap_pb2.RoomRegistration

    async def main():
        async with BootstrapClient(bootstrap.address) as client:
            await client.register_instance(info_factory(iid, dp_size=4))
            await client.register_instance(info_factory(follow, dp_size=2, method=common_pb2.LOAD_BALANCE_METHOD_FOLLOW_BOOTSTRAP_ROOM))
            async with grpc.aio.insecure_channel(bootstrap.address) as channel:
                stub = bootstrap_pb2_grpc.BootstrapServiceStub(channel)
                call = stub.RegisterRoomsStream(timeout=10)
                bad = [reg(instance_id=iid, bootstrap_room=0, dp_rank=1),
                       reg(instance_id=iid, bootstrap_room=20_002),  # no dp_rank
                       reg(instance_id=iid, bootstrap_room=20_003, dp_rank=4),  # dp_size is 4
                       reg(instance_id="nobody", bootstrap_room=20_004, dp_rank=0),
                       reg(instance_id=follow, bootstrap_room=20_005, dp_rank=0),  # 20005 % 2 == 1
                       reg(instance_id=iid, bootstrap_room=20_006, dp_rank=0, request_id="x" * 129)]
                await call.write(bootstrap_pb2.RegisterRoomsStreamRequest(tag=7, registrations=[
                    reg(instance_id=iid, bootstrap_room=20_001, dp_rank=1, request_id="a"), *bad]))
                first = await call.read()
                assert first.tag == 7 and first.ttl_ms > 0
                assert [r.bootstrap_room for r in first.results] == [20_001, 0, 20_002, 20_003, 20_004,
                                                                     20_005, 20_006]
                assert first.results[0].created and not first.results[0].HasField("status")
                got = [decode(r) for r in first.results[1:]]
                assert [code.name for code, _ in got] == [
                    "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "NOT_FOUND",
                    "FAILED_PRECONDITION", "INVALID_ARGUMENT"]
                assert got[0][1].reason == "INVALID_BOOTSTRAP_ROOM"
                assert got[4][1].reason == FollowBootstrapRoomConflict.default_reason
                # each failure is the one the unary RegisterRoom gives for the same fields
                for item, (code, info) in zip(bad, got):
                    unary = bootstrap_pb2.RegisterRoomRequest.FromString(item.SerializeToString())
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await stub.RegisterRoom(unary, timeout=5)
                    assert exc.value.code() == code
                    assert PdmeshError.from_rpc_error(exc.value).reason == info.reason
                assert decode(first.results[4])[1].metadata  # the values travel in metadata
                # the same stream goes on: a good registration, then a retry of the first one
                await call.write(bootstrap_pb2.RegisterRoomsStreamRequest(tag=8, registrations=[
                    reg(instance_id=iid, bootstrap_room=20_007, dp_rank=3, request_id="b"),
                    reg(instance_id=iid, bootstrap_room=20_001, dp_rank=1, request_id="a")]))
                second = await call.read()
                assert second.tag == 8
                assert [(r.created, r.HasField("status")) for r in second.results] == [(True, False),
                                                                                     (False, False)]
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
            assert await client.lookup_rooms([20_001, 20_007, 20_002], timeout=5) == {
                20_001: 1, 20_007: 3, 20_002: None}
    asyncio.run(main())


def test_a_malformed_message_ends_the_stream_typed(bootstrap):
    async def main():
        async with grpc.aio.insecure_channel(bootstrap.address) as channel:
            call = channel.stream_stream("/pdmesh.bootstrap.v1.BootstrapService/RegisterRoomsStream")(timeout=10)
            await call.write(b"\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call.read()
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    asyncio.run(main())


async def _start(port: int):
    _, _, service = create_bootstrap_server(f"127.0.0.1:{port}", BootstrapConfig(port=port))
    await service.start()
    return service


def test_the_client_stream_survives_a_restart_and_fails_promptly_when_unreachable():
    port = free_port()
    info = instance_info("prefill-restart", epoch=3, dp_size=2)

    async def main():
        first = await _start(port)
        async with BootstrapClient(f"127.0.0.1:{port}", connect_timeout_s=0.5) as client:
            await client.register_instance(info)
            assert await client.register_room_streamed("prefill-restart", 31, 1, "r-31") is True
            await first.stop(0)  # the service restarts: its registry and the stream are gone
            second = await _start(port)
            try:
                await client.register_instance(info)
                assert await client.register_room_streamed("prefill-restart", 31, 1, "r-31") is True
                assert second.registry.lookup(31).dp_rank == 1
            finally:
                await second.stop(0)
            t0 = time.perf_counter()  # gone for good: typed UNAVAILABLE at once, not at the deadline
            results = await asyncio.gather(*(client.register_room_streamed("prefill-restart", r, 0, timeout=30)
                                             for r in (40, 42)), return_exceptions=True)
            assert all(isinstance(r, Unavailable) for r in results), results
            assert time.perf_counter() - t0 < 10.0
    asyncio.run(main())


class BreaksOnce(bootstrap_pb2_grpc.BootstrapServiceServicer):
    """A service whose first registration stream records its first batch, then breaks unanswered."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.streams = 0

    async def RegisterRoomsStream(self, request_iterator, context):
        from pdmesh.server.register_stream import register_batch
        self.streams += 1
        async for request in request_iterator:
            response = register_batch(self.registry, request.registrations, 1000, request.tag)
            if self.streams == 1 and request.registrations:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            yield response


def test_registrations_in_flight_when_the_stream_breaks_are_sent_again_as_retries():
    from pdmesh.server.registry import Registry

    async def main():
        registry = Registry()
        registry.register_instance(instance_info("prefill-b", epoch=1, dp_size=2))
        servicer = BreaksOnce(registry)
        server = grpc.aio.server()
        bootstrap_pb2_grpc.add_BootstrapServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with BootstrapClient(f"127.0.0.1:{port}") as client:
                created = await asyncio.gather(*(client.register_room_streamed("prefill-b", r, r % 2, f"q-{r}")
                                                 for r in (71, 72, 73)))
                # recorded before the break, so the resent registrations are retries, not conflicts
                assert created == [False, False, False]
                assert servicer.streams == 2
                assert [registry.lookup(r).dp_rank for r in (71, 72, 73)] == [1, 0, 1]
        finally:
            await server.stop(0)
    asyncio.run(main())
