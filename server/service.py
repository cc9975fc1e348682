"""The BootstrapService servicer and the server factory (`create_bootstrap_server`).

The servicer only translates between protos and the registry (`pdmesh.server.registry`) and maps
errors (`grpcutil.translate_errors`: each `PdmeshError` becomes its status with an ErrorInfo).

Standalone: `pdmesh bootstrap` (see `pdmesh.server.cli`). Embedded, inside another process's
event loop (a prefill instance with `--bootstrap-port`)::

    server, port, service = create_bootstrap_server("127.0.0.1:8998", BootstrapConfig())
    await service.start()          # starts the gRPC server and the expiry sweeper
    ...
    await service.stop()           # graceful: in-flight calls get config.grace_s
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import NamedTuple

import grpc

from pdmesh import grpcutil, logs, metrics
from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.errors import DeadlineExceeded, NotFound
from pdmesh.reasons import Reason
from pdmesh.rules import required_dp_rank
from pdmesh.server.config import BootstrapConfig
from pdmesh.server.register_stream import RegistrationSession
from pdmesh.server.registry import Registry
from pdmesh.server.watch import WatchSession

log = logging.getLogger(__name__)
SERVICE_NAME = bootstrap_pb2.DESCRIPTOR.services_by_name["BootstrapService"].full_name


class BootstrapServicer(bootstrap_pb2_grpc.BootstrapServiceServicer):
    """gRPC face of one `Registry`."""

    def __init__(self, registry: Registry, config: BootstrapConfig) -> None:
        self.registry = registry
        self.config = config
        self.open_streams = 0  # WatchRooms streams being served now

    @grpcutil.translate_errors
    async def RegisterInstance(self, request, context):
        created = self.registry.register_instance(request.info)
        return bootstrap_pb2.RegisterInstanceResponse(
            created=created, heartbeat_interval_ms=int(self.config.heartbeat_interval_s * 1000))

    @grpcutil.translate_errors
    async def DeregisterInstance(self, request, context):
        self.registry.deregister_instance(request.instance_id, request.epoch)
        return bootstrap_pb2.DeregisterInstanceResponse()

    @grpcutil.translate_errors
    async def HeartbeatInstance(self, request, context):
        self.registry.heartbeat(request.instance_id, request.epoch)
        return bootstrap_pb2.HeartbeatInstanceResponse()

    @grpcutil.translate_errors
    async def GetInstance(self, request, context):
        info, age_s = self.registry.get_instance(request.instance_id)
        return bootstrap_pb2.GetInstanceResponse(info=info, last_seen_age_ms=int(age_s * 1000))

    @grpcutil.translate_errors
    async def ListInstances(self, request, context):
        return bootstrap_pb2.ListInstancesResponse(instances=self.registry.list_instances())

    @grpcutil.translate_errors
    async def RegisterRoom(self, request, context):
        required_dp_rank(request)
        logs.bind(room=request.bootstrap_room, instance=request.instance_id,
                  prefill_rank=request.dp_rank)
        created = self.registry.register_room(request.instance_id, request.bootstrap_room,
                                              request.dp_rank, request.request_id, request.epoch)
        if created:
            metrics.BOOTSTRAP_ROOMS_REGISTERED.inc()
            logs.event(log, logging.DEBUG, "room registered")
        return bootstrap_pb2.RegisterRoomResponse(created=created,
                                                  ttl_ms=int(self.config.room_ttl_s * 1000))

    @grpcutil.translate_errors
    async def RegisterRoomsStream(self, request_iterator, context):
        """The registration stream (`pdmesh.server.register_stream`): batches in, results out."""
        await RegistrationSession(self.registry, context, int(self.config.room_ttl_s * 1000)).run()

    @grpcutil.translate_errors
    async def LookupRoom(self, request, context):
        room = request.bootstrap_room
        logs.bind(room=room)
        if request.wait:
            await self._wait_for(room, request.wait_timeout_ms, context)
        record = self.registry.lookup(room)
        metrics.BOOTSTRAP_LOOKUPS.labels("LookupRoom", "missing" if record is None else "found").inc()
        if record is None:
            raise NotFound(f"room {room} is not registered (yet: ask with wait=true to wait for it)",
                           reason=Reason.ROOM_NOT_FOUND, metadata={"bootstrap_room": room})
        return bootstrap_pb2.LookupRoomResponse(bootstrap_room=room, dp_rank=record.dp_rank,
                                                instance_id=record.instance_id, epoch=record.epoch)

    async def _wait_for(self, room: int, wait_timeout_ms: int, context) -> None:
        """Long poll: return once `room` is registered; DEADLINE_EXCEEDED when the wait runs out."""
        future = asyncio.get_running_loop().create_future()

        def wake(_room: int, _rank: int) -> None:
            if not future.done():
                future.set_result(None)

        if self.registry.watch(room, wake) is not None:
            return
        timeout = self._wait_timeout(wait_timeout_ms, context.time_remaining())
        started, result = time.perf_counter(), "expired"
        try:
            await asyncio.wait_for(future, timeout)
            result = "registered"
        except (asyncio.TimeoutError, TimeoutError):
            raise DeadlineExceeded(
                f"room {room} was not registered within {timeout:.3f} s: the prefill failed, was "
                "never sent this room, or has not reached it yet", reason=Reason.ROOM_WAIT_TIMEOUT,
                metadata={"bootstrap_room": room, "waited_ms": int(timeout * 1000)}) from None
        finally:
            self.registry.unwatch(room, wake)
            metrics.BOOTSTRAP_WAIT_SECONDS.labels("LookupRoom", result).observe(
                time.perf_counter() - started)

    def _wait_timeout(self, wait_timeout_ms: int, remaining: float | None) -> float:
        timeout = wait_timeout_ms / 1000 if wait_timeout_ms else self.config.default_wait_s
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        return min(timeout, self.config.max_wait_s)

    @grpcutil.translate_errors
    async def RemoveRoom(self, request, context):
        self.registry.remove_room(request.bootstrap_room)
        return bootstrap_pb2.RemoveRoomResponse()

    @grpcutil.translate_errors
    async def WatchRooms(self, request_iterator, context):
        session = WatchSession(self.registry, context, default_wait_s=self.config.default_wait_s,
                               max_wait_s=self.config.max_wait_s)
        self.open_streams += 1
        try:
            await session.run()
        finally:
            self.open_streams -= 1


class BootstrapService:
    """A started-or-not bootstrap server: gRPC server, registry and expiry sweeper together."""

    def __init__(self, server: grpc.aio.Server, port: int, registry: Registry,
                 servicer: BootstrapServicer, health, config: BootstrapConfig, host: str) -> None:
        self.server, self.port, self.registry = server, port, registry
        self.servicer, self.health, self.config = servicer, health, config
        self.address = f"{host}:{port}"
        self._sweeper: asyncio.Task | None = None

    def gauge_samples(self):
        """Live gauges for /metrics: rooms, waiters, instances, open lookup streams."""
        stats = self.registry.stats()
        yield "pdmesh_bootstrap_rooms", (), stats["rooms"]
        yield "pdmesh_bootstrap_waiters", (), stats["waiters"]
        yield "pdmesh_bootstrap_instances", (), stats["instances"]
        yield "pdmesh_bootstrap_open_streams", (), self.servicer.open_streams

    async def start(self) -> None:
        await self.server.start()
        await grpcutil.set_serving(self.health, [SERVICE_NAME])
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        metrics.enable("bootstrap")
        self._untrack = metrics.track(self, BootstrapService.gauge_samples)
        log.info("bootstrap service serving on %s", self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls; calls in flight get `grace` seconds (config.grace_s by default)."""
        await grpcutil.set_serving(self.health, [SERVICE_NAME], serving=False)
        if getattr(self, "_untrack", None) is not None:
            self._untrack()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.server.stop(self.config.grace_s if grace is None else grace)

    async def _sweep(self) -> None:
        interval = max(0.05, min(1.0, self.config.room_ttl_s / 8))
        while True:
            await asyncio.sleep(interval)
            try:
                dropped = self.registry.expire()
            except Exception:  # never let the sweeper die silently
                log.exception("registry expiry failed")
                continue
            if dropped:
                log.debug("expired %d rooms", dropped)


class BootstrapServer(NamedTuple):
    server: grpc.aio.Server
    port: int
    service: BootstrapService


def create_bootstrap_server(address: str | None = None, config: BootstrapConfig | None = None,
                            registry: Registry | None = None) -> BootstrapServer:
    """Build (not start) a bootstrap server on `address` (default: config's host:port; port 0 = any).

    Returns `(server, port, service)`; `await service.start()` starts it (inside the caller's
    event loop), `await service.stop()` stops it. A port already served raises
    `grpcutil.BindError` at once (so_reuseport is off).
    """
    config = config or BootstrapConfig()
    address = address or config.address
    registry = registry or Registry(
        room_ttl_s=config.room_ttl_s, max_rooms=config.max_rooms, max_waiters=config.max_waiters,
        max_instances=config.max_instances, instance_ttl_s=config.instance_ttl_s)
    servicer = BootstrapServicer(registry, config)
    server, port, health = grpcutil.create_server(
        address, [lambda s: bootstrap_pb2_grpc.add_BootstrapServiceServicer_to_server(servicer, s)],
        [SERVICE_NAME], tls=config.tls)
    host = address.rsplit(":", 1)[0]
    return BootstrapServer(server, port, BootstrapService(server, port, registry, servicer, health,
                                                          config, host))
