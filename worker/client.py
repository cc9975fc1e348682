"""The typed client of a worker endpoint: `PrefillService`, `DecodeService` and `InstanceService`.

An instance's controller serves them to the router, and each DP rank serves the same services to
its controller; both callers use `WorkerClient` on their one channel to the peer:

    client = WorkerClient(channel)
    answer = await client.prefill(request, timeout=30)        # PrefillResponse
    async for message in client.decode(request, timeout=30):   # DecodeResponse, as they come
        ...
    found = await client.abort_room(room, "why")
    status = await client.status()                              # GetInstanceStatusResponse

Every failed call raises the typed `pdmesh.errors.PdmeshError` of its status (the worker's own code
and ErrorInfo reason), so no caller catches a bare `grpc.RpcError`. A failure the peer did not
send itself (its process died, the connection broke: no status details) has `sent_by_peer` False.
Cancelling the awaiting task, or `DecodeStream.cancel()`, cancels the call.
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from pdmesh.errors import PdmeshError
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc

#: Bound of the admin calls (abort, status, drain) unless the caller gives one.
ADMIN_TIMEOUT_S = 2.0


class DecodeStream:
    """One Decode call, started at once: iterate it for the tokens; `cancel()` ends it."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    def cancel(self) -> None:
        self._call.cancel()

    def __aiter__(self) -> AsyncIterator[worker_pb2.DecodeResponse]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[worker_pb2.DecodeResponse]:
        try:
            async for message in self._call:
                yield message
        except grpc.aio.AioRpcError as err:
            raise PdmeshError.from_rpc_error(err) from None


class WorkerClient:
    """Typed calls to one worker endpoint over a channel the caller owns (and closes)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self._prefill = worker_pb2_grpc.PrefillServiceStub(channel)
        self._decode = worker_pb2_grpc.DecodeServiceStub(channel)
        self._instance = worker_pb2_grpc.InstanceServiceStub(channel)

    async def prefill(self, request: worker_pb2.PrefillRequest, timeout: float) -> worker_pb2.PrefillResponse:
        return await self._unary(self._prefill.Prefill, request, timeout)

    def decode(self, request: worker_pb2.DecodeRequest, timeout: float) -> DecodeStream:
        return DecodeStream(self._decode.Decode(request, timeout=timeout))

    async def abort_room(self, room: int, reason: str = "", timeout: float = ADMIN_TIMEOUT_S) -> bool:
        """Whether the worker held anything of `room` (it frees it all)."""
        request = worker_pb2.AbortRoomRequest(bootstrap_room=room, reason=reason)
        return (await self._unary(self._instance.AbortRoom, request, timeout)).found

    async def status(self, timeout: float = ADMIN_TIMEOUT_S) -> worker_pb2.GetInstanceStatusResponse:
        return await self._unary(self._instance.GetInstanceStatus, worker_pb2.GetInstanceStatusRequest(),
                                 timeout)

    async def drain(self, timeout: float = ADMIN_TIMEOUT_S) -> worker_pb2.DrainResponse:
        return await self._unary(self._instance.Drain, worker_pb2.DrainRequest(), timeout)

    @staticmethod
    async def _unary(method, request, timeout: float):
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise PdmeshError.from_rpc_error(err) from None
