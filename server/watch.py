"""The server side of the WatchRooms lookup stream: one `WatchSession` per open stream.

A decode process keeps ONE stream per bootstrap address and multiplexes every lookup and wait of
every request over it (see `pdmesh.server.watcher`). Per request message the session answers at
once (tagged response: rooms found, missing, invalid) and keeps waiting for the rest; a room that
registers later, or whose wait runs out, is reported in an untagged response, batched with
whatever else became ready in the same event-loop turn. Waits are bounded (`wait_timeout_ms`,
capped by the service) and are all dropped when the stream ends, so nothing waits forever.
A wait may name the prefill instance and epoch it expects the room from (`wait_owners`): it fails
at once when that instance is registered under another epoch, now or later while it waits, so a
decode whose cached policy went stale re-resolves instead of waiting out its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import grpc

from pdmesh import metrics
from pdmesh.bootstrap.v1 import bootstrap_pb2
from pdmesh.errors import FailedPrecondition, NotFound, PdmeshError
from pdmesh.reasons import Reason
from pdmesh.rules import validate_room
from pdmesh.server.registry import Registry

log = logging.getLogger(__name__)
_LOOKED_UP = {result: metrics.BOOTSTRAP_LOOKUPS.labels("WatchRooms", result)
              for result in ("found", "missing", "invalid", "waited")}
_WAITED = {result: metrics.BOOTSTRAP_WAIT_SECONDS.labels("WatchRooms", result)
           for result in ("registered", "expired")}


def room_error(room: int, error: PdmeshError) -> bootstrap_pb2.RoomError:
    """One room's failure on the lookup stream: the google.rpc.Status a call would fail with (its
    ErrorInfo metadata names the room)."""
    error.metadata.setdefault("bootstrap_room", str(room))
    return bootstrap_pb2.RoomError(bootstrap_room=room, status=error.to_status_proto())


def _epoch_changed(room: int, instance_id: str, epoch: int, now: int) -> bootstrap_pb2.RoomError:
    return room_error(room, FailedPrecondition(
        f"prefill instance {instance_id} is registered under epoch {now}, not {epoch} as "
        "the caller resolved it: refresh its instance info and resolve the rank again",
        reason=Reason.INSTANCE_EPOCH_CHANGED,
        metadata={"instance_id": instance_id, "epoch": epoch, "registered_epoch": now}))


def _instance_gone(room: int, instance_id: str) -> bootstrap_pb2.RoomError:
    return room_error(room, NotFound(
        f"prefill instance {instance_id} deregistered while room {room} was awaited",
        reason=Reason.INSTANCE_NOT_FOUND, metadata={"instance_id": instance_id}))


def _invalid(room: int) -> bootstrap_pb2.RoomError:
    """The lookup stream's form of `validate_room`'s refusal (the same status a call gets)."""
    try:
        validate_room(room)
    except PdmeshError as err:
        return room_error(room, err)
    raise ValueError(f"room {room} is valid")


class WatchSession:
    """State of one WatchRooms stream: its waits, their timers, and the outbox of late answers."""

    def __init__(self, registry: Registry, context: grpc.aio.ServicerContext, *,
                 default_wait_s: float, max_wait_s: float) -> None:
        self._registry = registry
        self._context = context
        self._default_wait_s = default_wait_s
        self._max_wait_s = max_wait_s
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, asyncio.TimerHandle] = {}
        self._owners: dict[int, tuple[str, int]] = {}  # waiting room -> (instance id, epoch)
        registry.add_instance_listener(self._on_instance)
        self._since: dict[int, float] = {}  # loop time each waiting room's wait began (metrics)
        self._out_rooms: list[int] = []
        self._out_ranks: list[int] = []
        self._out_expired: list[int] = []
        self._out_errors: list[bootstrap_pb2.RoomError] = []
        self._flushing = False
        self._flush_task: asyncio.Task | None = None
        self._write_lock = asyncio.Lock()
        self._closing = False  # the stream is ending with an error: no more writes
        self._drained = asyncio.Event()

    async def run(self) -> None:
        """Serve the stream until the caller half-closes and every wait is answered, or it goes away.

        Reads with `context.read()` (cheaper than iterating the request iterator).
        """
        try:
            read, eof = self._context.read, grpc.aio.EOF
            while (request := await read()) is not eof:
                response = self._handle(request)
                if response is not None:
                    async with self._write_lock:
                        await self._context.write(response)
            while self._waiting or (self._flush_task is not None and not self._flush_task.done()):
                self._drained.clear()
                await self._drained.wait()
        except Exception:
            # The stream ends with an error status (a malformed message, say). grpc refuses to send
            # a status while a flush's write is in flight (TOO_MANY_OPERATIONS: the caller would
            # wait for its deadline): let that write finish and stop any later one first.
            async with self._write_lock:
                self._closing = True
            raise
        finally:
            self._close()

    def _handle(self, request: bootstrap_pb2.WatchRoomsRequest) -> bootstrap_pb2.WatchRoomsResponse | None:
        for room in request.cancel_bootstrap_rooms:
            self._cancel(room)
        found, ranks, missing, invalid = self._registry.lookup_many(request.bootstrap_rooms)
        if request.bootstrap_rooms:
            _LOOKED_UP["found"].inc(len(found))
            _LOOKED_UP["missing"].inc(len(missing))
            _LOOKED_UP["invalid"].inc(len(invalid))
        errors = [_invalid(r) for r in invalid]
        if request.wait_bootstrap_rooms:
            self._wait(request, found, ranks, errors)
        if request.tag:
            return bootstrap_pb2.WatchRoomsResponse(
                tag=request.tag, bootstrap_rooms=found, dp_ranks=ranks,
                missing_bootstrap_rooms=missing, errors=errors)
        if found or errors:  # untagged request: its immediate answers go out with the late ones
            self._out_rooms.extend(found)
            self._out_ranks.extend(ranks)
            self._out_errors.extend(errors)
            self._schedule_flush()
        return None

    def _wait(self, request, found: list[int], ranks: list[int],
              errors: list[bootstrap_pb2.RoomError]) -> None:
        asked = dict.fromkeys(request.wait_bootstrap_rooms)  # de-duplicated, in order
        again = [r for r in asked if r in self._waiting]  # re-asked while waiting: a new timer
        rooms = [r for r in asked if r not in self._waiting] if again else list(asked)
        timeout = request.wait_timeout_ms / 1000 if request.wait_timeout_ms else self._default_wait_s
        timeout = min(timeout, self._max_wait_s)
        owners = _owners(request)
        if owners:
            rooms = [r for r in rooms if not self._stale(r, owners.get(r), errors)]
        try:
            now_found, now_ranks, waiting, invalid = self._registry.lookup_many(rooms, self._on_registered)
        except PdmeshError as exc:  # too many waiters: these rooms fail, the stream goes on
            errors.extend(room_error(r, type(exc)(exc.message, reason=exc.reason, metadata=exc.metadata))
                          for r in rooms)
            return
        found.extend(now_found)
        ranks.extend(now_ranks)
        errors.extend(_invalid(r) for r in invalid)
        call_later = self._loop.call_later
        _LOOKED_UP["found"].inc(len(now_found))
        _LOOKED_UP["waited"].inc(len(waiting))
        now = self._loop.time()
        for room in waiting:
            self._waiting[room] = call_later(timeout, self._on_timeout, room)
            self._since[room] = now
            if room in owners:
                self._owners[room] = owners[room]
        for room in again:
            self._waiting[room].cancel()
            self._waiting[room] = call_later(timeout, self._on_timeout, room)

    def _stale(self, room: int, owner: tuple[str, int] | None, errors: list) -> bool:
        """Whether `room`'s expected owner is registered under another epoch (error added)."""
        if owner is None:
            return False
        now = self._registry.instance_epoch(owner[0])
        if now is None or now == owner[1]:
            return False
        errors.append(_epoch_changed(room, owner[0], owner[1], now))
        return True

    def _on_instance(self, instance_id: str, epoch: int | None) -> None:
        """Registry: `instance_id` registered a new epoch (or None: deregistered)."""
        if not self._owners:
            return
        for room, (owner, expected) in list(self._owners.items()):
            if owner == instance_id and expected != epoch:
                self._cancel(room)
                self._out_errors.append(_instance_gone(room, owner) if epoch is None
                                        else _epoch_changed(room, owner, expected, epoch))
                self._schedule_flush()

    def _on_registered(self, room: int, dp_rank: int) -> None:
        self._owners.pop(room, None)
        timer = self._waiting.pop(room, None)
        if timer is None:
            return
        timer.cancel()
        self._waited(room, "registered")
        self._out_rooms.append(room)
        self._out_ranks.append(dp_rank)
        self._schedule_flush()

    def _on_timeout(self, room: int) -> None:
        self._owners.pop(room, None)
        if self._waiting.pop(room, None) is not None:
            self._registry.unwatch(room, self._on_registered)
            self._waited(room, "expired")
            self._out_expired.append(room)
            self._schedule_flush()

    def _waited(self, room: int, result: str) -> None:
        since = self._since.pop(room, None)
        if since is not None:
            _WAITED[result].observe(self._loop.time() - since)

    def _cancel(self, room: int) -> None:
        self._since.pop(room, None)
        self._owners.pop(room, None)
        timer = self._waiting.pop(room, None)
        if timer is not None:
            timer.cancel()
            self._registry.unwatch(room, self._on_registered)

    def _schedule_flush(self) -> None:
        if not self._flushing:
            self._flushing = True
            self._flush_task = self._loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            async with self._write_lock:
                self._flushing = False
                if self._closing:
                    return
                rooms, ranks, expired, errors = (self._out_rooms, self._out_ranks, self._out_expired,
                                                 self._out_errors)
                self._out_rooms, self._out_ranks, self._out_expired, self._out_errors = [], [], [], []
                if rooms or expired or errors:
                    await self._context.write(bootstrap_pb2.WatchRoomsResponse(
                        bootstrap_rooms=rooms, dp_ranks=ranks, expired_bootstrap_rooms=expired,
                        errors=errors))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # the caller went away; run() sees it on its next read
            log.debug("WatchRooms write failed: %s", exc)
        finally:
            self._drained.set()

    def _close(self) -> None:
        self._registry.remove_instance_listener(self._on_instance)
        self._owners.clear()
        for room, timer in self._waiting.items():
            timer.cancel()
            self._registry.unwatch(room, self._on_registered)
        self._waiting.clear()
        self._since.clear()
        if self._flush_task is not None and not self._flush_task.done():
            self._flush_task.cancel()


def _owners(request: bootstrap_pb2.WatchRoomsRequest) -> dict[int, tuple[str, int]]:
    """room -> (instance id, epoch) for the waits that name one (the list parallels the rooms)."""
    owners = request.wait_owners
    if not owners or len(owners) != len(request.wait_bootstrap_rooms):
        return {}
    return {room: (o.instance_id, o.epoch)
            for room, o in zip(request.wait_bootstrap_rooms, owners) if o.instance_id}
