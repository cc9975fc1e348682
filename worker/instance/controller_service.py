"""gRPC servicers of an instance's controller endpoint: they translate and forward, nothing more.

`PrefillService.Prefill` and `DecodeService.Decode` pick a rank (`Controller.pick`) and forward the
request with the caller's deadline; `InstanceService` aborts rooms on every rank, reports status
and drains.
"""

from __future__ import annotations

from pdmesh.grpcutil import translate_errors
from pdmesh.rules import optional_dp_rank, validate_room
from pdmesh.worker.instance.controller import Controller
from pdmesh.worker.v1 import worker_pb2, worker_pb2_grpc


class PrefillControllerService(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    @translate_errors
    async def Prefill(self, request: worker_pb2.PrefillRequest, context) -> worker_pb2.PrefillResponse:
        routed = optional_dp_rank(request, "routed_dp_rank")
        rank = self.controller.pick(request.bootstrap_room, routed)
        return await self.controller.unary(rank, lambda client, timeout: client.prefill(request, timeout),
                                           context)


class DecodeControllerService(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    @translate_errors
    async def Decode(self, request: worker_pb2.DecodeRequest, context):
        rank = self.controller.pick(request.bootstrap_room, None)
        async for message in self.controller.stream(
                rank, lambda client, timeout: client.decode(request, timeout), context):
            yield message


class InstanceControllerService(worker_pb2_grpc.InstanceServiceServicer):
    def __init__(self, controller: Controller, on_drained) -> None:
        self.controller = controller
        self._on_drained = on_drained

    @translate_errors
    async def AbortRoom(self, request, context) -> worker_pb2.AbortRoomResponse:
        validate_room(request.bootstrap_room)  # room 0 or >= 2^63 is bad input, not an unknown room
        return worker_pb2.AbortRoomResponse(found=await self.controller.abort_room(request))

    @translate_errors
    async def GetInstanceStatus(self, request, context) -> worker_pb2.GetInstanceStatusResponse:
        return await self.controller.status()

    @translate_errors
    async def Drain(self, request, context) -> worker_pb2.DrainResponse:
        self._on_drained(self.controller.drain())  # no new work from now on
        # what it holds, counted as GetInstanceStatus counts it (a rank's rooms, or its calls in flight)
        status = await self.controller.status()
        return worker_pb2.DrainResponse(active_requests=sum(r.active_requests for r in status.ranks))
