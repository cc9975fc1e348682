"""`WorkerClient` against a real server at port 0: each failure comes back as the typed error of
its status (the worker's own code, reason and metadata), a broken connection as one the peer did
not send, and a cancelled decode stream ends the call."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdmesh import grpcutil
from pdmesh.common.v1 import common_pb2
from pdmesh.errors import FollowBootstrapRoomConflict, PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.worker.client import WorkerClient
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc


class FakeWorker(worker_pb2_grpc.PrefillServiceServicer, worker_pb2_grpc.DecodeServiceServicer,
                 worker_pb2_grpc.InstanceServiceServicer):
    def __init__(self) -> None:
        self.decode_ended = asyncio.Event()

    @grpcutil.translate_errors
    async def Prefill(self, request, context):
        raise FollowBootstrapRoomConflict("rank 1 took room 4", metadata={"bootstrap_room": request.bootstrap_room})

    async def Decode(self, request, context):
        try:
            yield worker_pb2.DecodeResponse(token_ids=[7])
            await asyncio.sleep(60)
        finally:
            self.decode_ended.set()

    @grpcutil.translate_errors
    async def GetInstanceStatus(self, request, context):
        return worker_pb2.GetInstanceStatusResponse(role=common_pb2.INSTANCE_ROLE_DECODE)

    @grpcutil.translate_errors
    async def Drain(self, request, context):
        raise Unavailable("already draining", reason=Reason.INSTANCE_DRAINING)


def test_failures_come_back_typed_and_a_cancelled_stream_ends():
    async def main():
        fake = FakeWorker()
        server, port, _ = grpcutil.create_server("127.0.0.1:0", [
            lambda s: worker_pb2_grpc.add_PrefillServiceServicer_to_server(fake, s),
            lambda s: worker_pb2_grpc.add_DecodeServiceServicer_to_server(fake, s),
            lambda s: worker_pb2_grpc.add_InstanceServiceServicer_to_server(fake, s)], [])
        await server.start()
        try:
            async with grpcutil.open_channel(f"127.0.0.1:{port}") as channel:
                client = WorkerClient(channel)
                with pytest.raises(FollowBootstrapRoomConflict) as err:
                    await client.prefill(worker_pb2.PrefillRequest(bootstrap_room=4), timeout=10)
                assert err.value.metadata == {"bootstrap_room": "4"} and err.value.sent_by_peer
                with pytest.raises(Unavailable) as err:
                    await client.drain()
                assert err.value.reason is Reason.INSTANCE_DRAINING
                assert (await client.status(timeout=10)).role == common_pb2.INSTANCE_ROLE_DECODE
                stream = client.decode(worker_pb2.DecodeRequest(bootstrap_room=4), timeout=10)
                async for message in stream:
                    assert list(message.token_ids) == [7]
                    stream.cancel()
                    break
                await asyncio.wait_for(fake.decode_ended.wait(), 10)
        finally:
            await server.stop(None)
        async with grpcutil.open_channel(f"127.0.0.1:{port}") as channel:  # nothing serves it now
            with pytest.raises(PdmeshError) as err:
                await WorkerClient(channel).abort_room(4, timeout=10)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and not err.value.sent_by_peer
    asyncio.run(main())
