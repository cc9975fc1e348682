"""`BootstrapClient`: the async Python client of the bootstrap service.

Every failed call raises the typed `pdmesh.errors` class of its status (NotFound with reason
ROOM_NOT_FOUND, InvalidArgument with INVALID_BOOTSTRAP_ROOM, ...), never a bare `grpc.RpcError`.
Unary calls carry a deadline (`timeout`, default `default_timeout_s`). Waiting for rooms goes over
the process-wide lookup stream (`pdmesh.server.watcher.RoomWatcher`), registering them in a
serving process over the registration stream (`pdmesh.server.registrar.RoomRegistrar`): use
`shared_client(address)` so that every request of a process shares one channel and one stream of
each kind per bootstrap address.

    client = shared_client("127.0.0.1:8998")
    await client.register_instance(info)                         # a prefill, at start
    await client.register_room_streamed("prefill-0", room, dp_rank=1, request_id="req-7")  # a prefill
    rank = await client.wait_for_room(room, timeout=5.0)         # a decode
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable

from pdmesh import grpcutil
from pdmesh.bootstrap.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from pdmesh.errors import NotFound, PdmeshError, Unavailable
from pdmesh.reasons import Reason
from pdmesh.rules import validate_room
from pdmesh.server.registrar import RoomRegistrar
from pdmesh.server.watcher import RoomWatcher
from pdmesh.tls import TlsConfig

log = logging.getLogger(__name__)
# Reconnect quickly after the service restarts (grpc's default first backoff is 1 s, growing to 120 s).
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class BootstrapClient:
    """Client of one bootstrap service address: one channel, one lookup and one registration stream."""

    def __init__(self, address: str, *, default_timeout_s: float = 5.0,
                 connect_timeout_s: float = 1.0, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.default_timeout_s = default_timeout_s
        self._channel = grpcutil.open_channel(address, options=RECONNECT_OPTIONS, tls=tls)
        self._stub = bootstrap_pb2_grpc.BootstrapServiceStub(self._channel)
        self._watcher = RoomWatcher(self._stub, address, connect_timeout_s=connect_timeout_s)
        self._registrar = RoomRegistrar(self._stub, address, connect_timeout_s=connect_timeout_s)

    @property
    def channel(self):
        """The one channel to the service (its connectivity tells when the connection was made anew)."""
        return self._channel

    async def __aenter__(self) -> "BootstrapClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._watcher.close()
        await self._registrar.close()
        await self._channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.default_timeout_s if timeout is None else timeout

    # ---- instances -------------------------------------------------------------------------

    async def register_instance(self, info: bootstrap_pb2.InstanceInfo, *,
                                timeout: float | None = None) -> bootstrap_pb2.RegisterInstanceResponse:
        """Publish a prefill instance (idempotent for the same id, epoch and info)."""
        request = bootstrap_pb2.RegisterInstanceRequest(info=info)
        return await grpcutil.call(self._stub.RegisterInstance(request, timeout=self._t(timeout)))

    async def deregister_instance(self, instance_id: str, epoch: int = 0, *,
                                  timeout: float | None = None) -> None:
        request = bootstrap_pb2.DeregisterInstanceRequest(instance_id=instance_id, epoch=epoch)
        await grpcutil.call(self._stub.DeregisterInstance(request, timeout=self._t(timeout)))

    async def heartbeat_instance(self, instance_id: str, epoch: int, *,
                                 timeout: float | None = None) -> None:
        """NotFound (INSTANCE_NOT_FOUND) means the service restarted: register again."""
        request = bootstrap_pb2.HeartbeatInstanceRequest(instance_id=instance_id, epoch=epoch)
        await grpcutil.call(self._stub.HeartbeatInstance(request, timeout=self._t(timeout)))

    async def get_instance(self, instance_id: str, *,
                           timeout: float | None = None) -> bootstrap_pb2.InstanceInfo:
        """The instance's published info. A connection that failed (a handshake that ran past its
        time while both processes were busy) is given one more try within the same timeout."""
        request = bootstrap_pb2.GetInstanceRequest(instance_id=instance_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._t(timeout)
        try:
            response = await grpcutil.call(self._stub.GetInstance(request, timeout=self._t(timeout)))
        except Unavailable as err:
            try:
                await asyncio.wait_for(self.channel.channel_ready(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise err from None
            response = await grpcutil.call(self._stub.GetInstance(
                request, timeout=max(deadline - loop.time(), 0.001)))
        return response.info

    async def list_instances(self, *, timeout: float | None = None) -> list[bootstrap_pb2.InstanceInfo]:
        response = await grpcutil.call(self._stub.ListInstances(
            bootstrap_pb2.ListInstancesRequest(), timeout=self._t(timeout)))
        return list(response.instances)

    async def keep_registered(self, info: bootstrap_pb2.InstanceInfo, *,
                              interval_s: float | None = None) -> None:
        """Register `info`, then heartbeat forever; register again whenever the service forgot it
        (it restarted). Run it as a task and cancel it at shutdown.

        Raises FailedPrecondition (INSTANCE_EPOCH_STALE / INSTANCE_EPOCH_MISMATCH) when a newer
        epoch of the same instance is registered: this process was replaced. Other failures
        (the service unreachable) are logged and retried at the heartbeat pace.
        """
        registered = False
        while True:
            try:
                if not registered:
                    response = await self.register_instance(info)
                    registered = True
                    interval_s = interval_s or max(response.heartbeat_interval_ms / 1000, 0.05)
                else:
                    await self.heartbeat_instance(info.instance_id, info.epoch)
            except NotFound:
                log.info("bootstrap %s forgot instance %s; registering again", self.address,
                         info.instance_id)
                registered = False
                continue
            except PdmeshError as exc:
                if exc.reason in (Reason.INSTANCE_EPOCH_STALE, Reason.INSTANCE_EPOCH_MISMATCH):
                    raise
                log.warning("bootstrap %s: %s", self.address, exc)
            await asyncio.sleep(interval_s or 1.0)

    # ---- rooms -----------------------------------------------------------------------------

    async def register_room(self, instance_id: str, room: int, dp_rank: int, request_id: str = "", *,
                            epoch: int = 0, timeout: float | None = None) -> bool:
        """Record room -> dp_rank; True if new, False for an idempotent retry (same request_id)."""
        request = bootstrap_pb2.RegisterRoomRequest(instance_id=instance_id, bootstrap_room=room,
                                                    dp_rank=dp_rank, request_id=request_id, epoch=epoch)
        response = await grpcutil.call(self._stub.RegisterRoom(request, timeout=self._t(timeout)))
        return response.created

    async def register_room_streamed(self, instance_id: str, room: int, dp_rank: int,
                                     request_id: str = "", *, epoch: int = 0,
                                     timeout: float | None = None) -> bool:
        """`register_room` over the shared registration stream (what a serving prefill uses):
        registrations made together go out in one message. The same typed errors; Unavailable
        promptly if the service cannot be reached; survives a restart of the service."""
        registration = bootstrap_pb2.RoomRegistration(instance_id=instance_id, bootstrap_room=room,
                                                      dp_rank=dp_rank, request_id=request_id,
                                                      epoch=epoch)
        return await self._registrar.register(registration, self._t(timeout))

    def remove_room_streamed(self, room: int) -> None:
        """`remove_room` over the registration stream, with its next message and unanswered: what a
        prefill does once a room's transfer ended (best effort; the record's TTL is the backstop)."""
        validate_room(room)
        self._registrar.remove(room)

    async def lookup_room(self, room: int, wait: bool = False, timeout: float | None = None
                          ) -> bootstrap_pb2.LookupRoomResponse:
        """One unary lookup (NotFound if absent); with `wait`, a long poll of at most `timeout` s.

        Prefer `wait_for_room` in a serving process: it shares one stream with every other wait.
        """
        validate_room(room)
        timeout = self._t(timeout)
        request = bootstrap_pb2.LookupRoomRequest(bootstrap_room=room, wait=wait,
                                                  wait_timeout_ms=int(timeout * 1000) if wait else 0)
        # The service ends the wait itself (ROOM_WAIT_TIMEOUT); the deadline is a backstop.
        deadline = timeout + 1.0 if wait else timeout
        return await grpcutil.call(self._stub.LookupRoom(request, timeout=deadline))

    async def remove_room(self, room: int, *, timeout: float | None = None) -> None:
        request = bootstrap_pb2.RemoveRoomRequest(bootstrap_room=room)
        await grpcutil.call(self._stub.RemoveRoom(request, timeout=self._t(timeout)))

    async def wait_for_room(self, room: int, timeout: float,
                            owner: tuple[str, int] | None = None) -> int:
        """The prefill DP rank of `room`, as soon as it is registered (over the shared stream).

        DeadlineExceeded (ROOM_WAIT_TIMEOUT) at `timeout`; Unavailable promptly if the service
        cannot be reached; survives a restart of the service within the reconnect window. With
        `owner` = (prefill instance id, epoch the caller resolved): FailedPrecondition
        INSTANCE_EPOCH_CHANGED at once when that instance is registered under another epoch.
        """
        return await self._watcher.wait_for_room(room, timeout, owner)

    async def lookup_rooms(self, rooms: Iterable[int], timeout: float | None = None
                           ) -> dict[int, int | None]:
        """Look many rooms up in one round trip of the shared stream; None where not registered."""
        return await self._watcher.lookup_rooms(rooms, self._t(timeout))

    async def ping(self, timeout: float | None = None) -> None:
        """An empty round trip on the shared stream."""
        await self._watcher.ping(self._t(timeout))


_SHARED: dict[tuple, tuple[asyncio.AbstractEventLoop, BootstrapClient]] = {}


def shared_client(address: str, tls: TlsConfig | None = None) -> BootstrapClient:
    """The process's one client (channel and lookup stream) for `address`, in the running loop;
    `tls` (the process's TlsConfig, None for plaintext) secures its channel."""
    loop = asyncio.get_running_loop()
    for key in [k for k, (lp, _) in _SHARED.items() if lp.is_closed()]:
        del _SHARED[key]  # a finished asyncio.run() left it behind (its channel died with its loop)
    key = (id(loop), address, tls)
    entry = _SHARED.get(key)
    if entry is None or entry[0] is not loop:
        entry = _SHARED[key] = (loop, BootstrapClient(address, tls=tls))
    return entry[1]


async def close_shared_clients() -> None:
    """Close every shared client of the running loop (at process shutdown, or between tests)."""
    loop = asyncio.get_running_loop()
    for key in [k for k, (lp, _) in _SHARED.items() if lp is loop]:
        await _SHARED.pop(key)[1].close()
